"""A longer run of the property tests of tests/property/ (rule parser, Go regexps, breaker
expressions, dynamic config decoder), bounded in time.

CI runs each property with the `ci` Hypothesis profile (200 examples). This runs rounds with
the `soak` profile (--examples per property, default 5000), each round a fresh pytest process
with its own seed, until --seconds have passed; a round still running at the deadline is
stopped. It stops by itself and exits non-zero if any round found a failure (the failing
example and its `@reproduce_failure` blob are in the printed output):

    python bench/property_soak.py [--seconds 600] [--examples 5000] [-k EXPR]
"""

from __future__ import annotations

import argparse
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=600.0, help="total time budget")
    parser.add_argument("--examples", type=int, default=5000, help="examples per property")
    parser.add_argument("-k", default="not no_growth", help="pytest -k expression")
    args = parser.parse_args()
    deadline = time.monotonic() + args.seconds
    env = {
        **os.environ,
        "HYPOTHESIS_PROFILE": "soak",
        "PROPERTY_SOAK_EXAMPLES": str(args.examples),
    }
    rounds = failures = 0
    examples = 0
    while (left := deadline - time.monotonic()) > 5:
        seed = random.randrange(2**32)
        command = [
            sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/property",
            "-k", args.k, f"--hypothesis-seed={seed}", "--hypothesis-show-statistics",
        ]  # fmt: skip
        started = time.monotonic()
        try:
            done = subprocess.run(
                command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=left
            )
        except subprocess.TimeoutExpired:
            print(f"round {rounds + 1} (seed {seed}): stopped at the time budget", flush=True)
            break
        rounds += 1
        found = sum(int(n) for n in re.findall(r"(\d+) passing, \d+ failing", done.stdout))
        examples += found
        summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
        print(
            f"round {rounds} (seed {seed}): {summary}; {found} passing examples "
            f"in {time.monotonic() - started:.0f} s",
            flush=True,
        )
        if done.returncode != 0:
            failures += 1
            print(done.stdout[-20000:])
            print(done.stderr[-5000:])
    print(
        f"{rounds} rounds, {examples} passing examples, {failures} failing rounds "
        f"in {args.seconds - max(0.0, deadline - time.monotonic()):.0f} s"
    )
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
