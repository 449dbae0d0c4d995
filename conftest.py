"""Settings for every test directory: the Hypothesis profiles and their example database.

``HYPOTHESIS_PROFILE`` picks the profile (default ``ci``):

* ``ci``: a bounded budget so the whole suite's property tests and ``fuzz/`` run in well under a
  minute, with no per-example deadline (shared CI machines stall; a slow example is not a bug).
* ``fuzz``: a long campaign, see ``fuzz/README.md``.

Failing examples are saved in ``<repo>/.hypothesis/examples`` whatever the working directory, so
a failure found by a long campaign is replayed first by the next ``ci`` run on the same machine.
"""

from __future__ import annotations

import os
from pathlib import Path

from hypothesis import settings
from hypothesis.database import DirectoryBasedExampleDatabase

_DATABASE = DirectoryBasedExampleDatabase(
    Path(__file__).resolve().parent / ".hypothesis" / "examples"
)

# 200 examples per target keeps each one around a second (byte-by-byte feeding included).
settings.register_profile("ci", max_examples=200, deadline=None, database=_DATABASE)
# A long run: roughly an hour per structured ClientHello target on one core (~20 ms an example).
settings.register_profile(
    "fuzz", max_examples=200_000, deadline=None, database=_DATABASE, print_blob=True
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


if os.environ.get("TRIO_SNI_INSTALLED") == "1":
    # .ci/installed-wheel: the tests must exercise the installed wheel, not this checkout.
    import trio_sni

    assert "site-packages" in trio_sni.__file__, f"testing {trio_sni.__file__}, not the wheel"
