"""Benchmarks of what MSD costs and buys: step time, peak memory, data loading, quality.

Run them from the repository root as modules, for example
``python -m benchmarks.step_cost --help``; ``docs/benchmarks.md`` records the results.
"""
