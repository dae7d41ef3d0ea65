"""What jobs/benchmark.py compares and how: the peer systems (`systems`) and the figures (`figures`).

Not part of the runner library: these are the benchmark's own baselines, each written the way
its users write it, and the arithmetic that turns their runs into one table.
"""
