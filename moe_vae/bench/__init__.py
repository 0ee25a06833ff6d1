"""Benchmarks shipped with the package: `moe-vae bench` (ours against a naive port)."""
