"""Hypothesis profiles for the whole suite.

- "dev" (the default): Hypothesis explores fresh random examples each run and keeps failing ones in
  .hypothesis/ to replay first next time: a run may find a new bug, which is what it is for.
- "ci" (HYPOTHESIS_PROFILE=ci, or whenever the CI variable is set): derandomize=True, so every run
  draws the same examples (seeded from each test's name) and a red build always means the change
  under test, never a lucky draw; no database, since nothing is kept between CI runs.

Both print a reproduction blob with any failure. Tests' own @settings (max_examples, deadline, ...)
take precedence; they inherit the rest from the loaded profile.
"""
from __future__ import annotations

import os

from hypothesis import settings

settings.register_profile("dev", print_blob=True)
settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "dev"))
