"""`python -m bench all [--quick] [--json OUT]`: see bench/perf.py (run from the repository root)."""

from bench.perf import main

if __name__ == "__main__":
    raise SystemExit(main())
