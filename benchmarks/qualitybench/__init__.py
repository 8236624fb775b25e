"""benchmarks/quality.py's parts: grid (data, split, the cached steps, each a call of plabel) and
report (tables and matplotlib figures)."""
