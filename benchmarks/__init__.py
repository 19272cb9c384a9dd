"""The measuring harnesses, outside the package: `psynth bench <name>` or `python -m benchmarks.<name>`.

Every benchmark runs on one harness (harness.py: options, columns, timings, metadata, results)
and measures the package's own functions with random weights of a named architecture: ttft.py
(+ ttft_report.py), batch.py, decode.py, train_step.py (`bench train`), token_sampling.py
(`bench sampling`), roofline.py, peer.py (PyTorch + transformers), kernels.py (correctness of the
fused attention kernels; also tests/test_kernels_gpu.py); plots.py draws every one's PNG. The GPU
check: gpu_check.py (the driver), gpu_steps.py (its steps), gpu_figures.py and gpu_docs.py (its
figures and the doc updater; launch/gpu_check.sh).

Only the model and inference code is imported by the sweeps (no training, data or torch, except
`bench train`, `bench peer` and `--torch-peer`); matplotlib is imported when plotting, so a bare
inference box can still run them. Results of committed runs live in results/ (README.md).
"""
