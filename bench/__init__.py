"""Benchmarks. `python -m bench all --json out.json` runs the performance suite (bench/perf.py, issue 7); the other
files are standalone scripts (`python bench/NAME.py --help`)."""
