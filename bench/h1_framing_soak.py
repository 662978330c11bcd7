"""A longer run of the HTTP/1.1 framing property test (tests/unit/test_h1_framing_properties.py).

CI runs a bounded number of examples; this runs many more, bounded in time, and stops by
itself:

    python bench/h1_framing_soak.py [--seconds 120] [--examples 20000]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hypothesis import HealthCheck, given, settings

from tests.unit.test_h1_framing_properties import (
    request_stream,
    test_arbitrary_request_streams_never_crash_hang_or_leak,
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--examples", type=int, default=20_000)
    args = parser.parse_args()
    deadline = time.monotonic() + args.seconds
    inner = test_arbitrary_request_streams_never_crash_hang_or_leak.hypothesis.inner_test
    runs = 0

    @settings(
        max_examples=args.examples,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(request_stream())
    def soak(pieces: list[bytes]) -> None:
        nonlocal runs
        if time.monotonic() > deadline:
            return
        runs += 1
        inner(pieces)

    soak()
    print(f"{runs} request streams: no crash, hang or leak")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
