"""What is not on the main job's path: sweeps, re-evaluation, the decomposition, the profiler.

Run from the repository root as modules, e.g. `python -m experiments.compare --help`; they import the
top-level files, which never import them.
"""
