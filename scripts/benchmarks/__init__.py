"""The benchmark behind BENCHMARKS.md, run as `python scripts/benchmark.py`.

Modules, bottom to top: `settings` (shapes, sizes, targets), `harness` (timing, memory sampling, worker
processes, machine description), `variants` (the hf-wemoe models and the static baseline, random weights),
`fusionbench` (FusionBench's WeightEnsemblingMoE built from the same weights), one module per section
(`forward`, `train`, `merge`, `size`: each measures, turns its results into report rows and targets, and
explains them in notes), `report` (renders `report.md.j2`) and `main` (the command line).
"""
