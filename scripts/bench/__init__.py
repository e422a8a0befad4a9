"""Benchmarks: probes of time and memory, each with its protocol in its docstring; run from the
repository root as ``python -m scripts.bench.<name>``. Training comparisons are sweeps
(``configs/sweeps/``, ``python -m train.sweep``), not scripts."""
