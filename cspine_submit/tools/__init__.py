"""Tools around the run: benchmarks, the Kaggle bundle, the built-in demo, crop previews, reproducibility checks.

Import the module you need (``from cspine_submit.tools import bundle``): each is independent of the others.
"""
