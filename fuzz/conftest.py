"""Hypothesis profiles for the fuzz targets, and the shared example database.

``HYPOTHESIS_PROFILE`` picks the profile (default ``ci``):

* ``ci``: a bounded budget so the whole ``fuzz/`` directory runs in well under a minute, with no
  per-example deadline (shared CI machines stall; a slow example is not a bug here).
* ``fuzz``: a long campaign, see ``fuzz/README.md``.

Failing examples are saved in ``<repo>/.hypothesis/examples`` whatever the working directory, so
a failure found by a long campaign is replayed first by the next ``ci`` run on the same machine.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from hypothesis import settings
from hypothesis.database import DirectoryBasedExampleDatabase

HERE = Path(__file__).resolve().parent
# pytest runs with --import-mode=importlib, which does not put test directories on sys.path;
# this makes `import strategies` work for the fuzz targets.
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

_DATABASE = DirectoryBasedExampleDatabase(HERE.parent / ".hypothesis" / "examples")

# 200 examples per target keeps each one around a second (byte-by-byte feeding included).
settings.register_profile("ci", max_examples=200, deadline=None, database=_DATABASE)
# A long run: roughly an hour per structured ClientHello target on one core (~20 ms an example).
settings.register_profile(
    "fuzz", max_examples=200_000, deadline=None, database=_DATABASE, print_blob=True
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
