"""Benchmarks: `psynth bench ttft` (text path vs cache path time-to-first-token) and its plots.

Only the model and inference code is imported here (no training, data or torch); matplotlib is
imported lazily by the plotting functions, so a bare inference box can still run the sweeps.
"""
