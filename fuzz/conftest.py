"""Make the fuzz targets' shared strategies importable (profiles live in the root conftest.py)."""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# pytest runs with --import-mode=importlib, which does not put test directories on sys.path;
# this makes `import strategies` work for the fuzz targets.
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
