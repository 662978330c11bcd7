"""`python -m bench [--quick]`: every workload through every proxy in one run (bench/suite.py)."""

from bench.suite import main

raise SystemExit(main())
