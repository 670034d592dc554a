"""The GPU benchmark run: `run.sh`, `download_wheels.sh`, `paper_epoch` (benchmarks/README.md, "GPU")."""
