"""Hypothesis profiles for the property tests (issue 9, "Bad input, in general").

`ci` (the default): a bounded number of examples per property, so the suite stays a few seconds
per file on a 2-core machine; the deadline is generous (a shared CI machine stalls) yet turns a
hang into a failure. `soak`: what bench/property_soak.py runs, many more examples per round.
Choose with HYPOTHESIS_PROFILE=soak. No example database is written (the tree is shared, and a
failure prints the example to reproduce it).
"""

from __future__ import annotations

import os
from datetime import timedelta

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    max_examples=200,
    deadline=timedelta(seconds=2),
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "soak",
    max_examples=int(os.environ.get("PROPERTY_SOAK_EXAMPLES", "5000")),
    deadline=timedelta(seconds=5),
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
