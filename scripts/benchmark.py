"""Benchmark hf-wemoe against a static CLIPVisionModel and FusionBench's WeightEnsemblingMoE; write BENCHMARKS.md.

Everything runs at real CLIP shapes with random weights (no downloads): ViT-B/32 by default, `--shape L/14`.

    python scripts/benchmark.py                       # the full run behind BENCHMARKS.md (~15 min on 2 cores)
    python scripts/benchmark.py --quick --output /tmp/bench.md   # a smoke run with small batches
    python scripts/benchmark.py --smoke --output /tmp/bench.md   # the same at a tiny shape: checks the harness

Sections (`--sections`, default all):
- forward: forward time at two batch sizes for a static CLIPVisionModel, hf-wemoe per-sample and batch routing,
  E-WEMoE-90% and FusionBench's per-sample WeightEnsemblingMoE built from the same weights (with the largest
  absolute difference of its outputs from hf-wemoe's). All variants live in this process and are timed round-robin,
  so load from other processes affects them alike; medians are reported.
- train: one router-training step (forward, backward to the routers, Adam step), time and peak resident memory;
  each variant runs in a fresh worker process so that its peak RSS is its own.
- merge: `hf-wemoe merge` of 8 experts from safetensors checkpoints, time and peak RSS (sampled with psutil),
  against a process that loads all 9 models with `from_pretrained` at once.
- size: saved size of WEMoE dense and E-WEMoE-90%, float32 and bfloat16 task vectors (written by `hf-wemoe merge`).

Needs the `bench` extra (`pip install -e .[bench]`): fusion-bench and psutil. The code is the `benchmarks`
package next to this file (harness, variants, the FusionBench adapter, one module per section, the report
template `benchmarks/report.md.j2`).
"""

from __future__ import annotations

from benchmarks.main import main

if __name__ == "__main__":
    raise SystemExit(main(description=__doc__))
