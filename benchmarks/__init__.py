"""The benchmarks of torch-dendrites: task benchmarks, the growth-defaults suite, experiments and timing tables.

Not part of the installed package. Run each module from the repository root, e.g.
``python -m benchmarks.run tabular --quick --seeds 1`` (the modules' docstrings say what each one runs).
"""
