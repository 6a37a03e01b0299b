"""Benchmarks of rtmanager against its raw floor, measured side by side.

Run them all with `.venv/bin/python -m bench.run [--quick] [--out FILE]` from
the repository root; see `bench/README.md` for what each one measures.
"""
