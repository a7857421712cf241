"""Start a benchmark module in a child process that works from any working directory.

Children run as ``python -m benchmarks.<module>`` with the repository root on their ``PYTHONPATH``, so their
working directory can be a fresh folder of their own (the peer library writes files into it).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Dict, List

ROOT = Path(__file__).resolve().parents[1]  # the repository root, which holds the benchmarks package


def module_command(module: str, *args: str) -> List[str]:
    """``[python, "-m", "benchmarks.<module>", *args]`` for this interpreter."""
    return [sys.executable, "-m", f"benchmarks.{module}", *args]


def child_env() -> Dict[str, str]:
    """This process's environment, offline (no model hub), a headless plotting backend and the repository root
    first on ``PYTHONPATH``."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg", "PYTHONPATH": path}
