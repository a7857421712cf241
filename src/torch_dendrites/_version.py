"""The library's version (a leaf module: the recipe writer reads it without importing the package)."""

__version__ = "0.1.0"
