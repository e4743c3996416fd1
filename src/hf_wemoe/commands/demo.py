"""``hf-wemoe demo``: the whole chain, offline."""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "demo",
        help="run the method end to end offline on built-in tiny models",
        description=(
            "Build tiny CLIP vision experts offline, merge them into a WEMoE model, save it, reload it with "
            "transformers' AutoModel and check the round trip and the collapse to a static model."
        ),
    )
    parser.add_argument(
        "--output", type=Path, default=None, help="folder for the merged model (default: temporary)"
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    return parser


def run(args: argparse.Namespace) -> int:
    from transformers import AutoModel, CLIPVisionConfig, CLIPVisionModel

    from ..merging import build_wemoe

    start = time.perf_counter()
    torch.manual_seed(args.seed)
    config = CLIPVisionConfig(
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        image_size=32,
        patch_size=4,
    )
    base = CLIPVisionModel(config).eval()
    experts = {}
    for name in ("shapes", "digits", "textures"):
        expert = CLIPVisionModel(config).eval()
        expert.load_state_dict({k: v + 0.02 * torch.randn_like(v) for k, v in base.state_dict().items()})
        experts[name] = expert
    model = build_wemoe(base, experts, seed=args.seed)
    output = args.output or Path(tempfile.mkdtemp(prefix="hf-wemoe-demo-")) / "wemoe"
    model.save_pretrained(output)
    reloaded = AutoModel.from_pretrained(output)
    pixel_values = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        outputs = reloaded(pixel_values, output_routing_weights=True)
        same = torch.equal(outputs.pooler_output, model(pixel_values).pooler_output)
        static = model.collapse(torch.tensor([1.0, 0.0, 0.0]))
        gap = (
            static(pixel_values).pooler_output
            - model(pixel_values, force_routing=torch.tensor([1.0, 0, 0])).pooler_output
        )
    routers = sum(p.numel() for p in model.router_parameters())
    print(f"merged {len(experts)} experts into {output}")
    print(
        f"trainable router parameters: {routers:,}; routing weights of layer 0, sample 0: "
        f"{[round(v, 3) for v in outputs.routing_weights[0][0].tolist()]}"
    )
    print(
        f"reloaded with AutoModel: outputs identical = {same}; collapse max |diff| = {gap.abs().max().item():.2e}"
    )
    print(f"done in {time.perf_counter() - start:.1f}s")
    return 0 if same else 1
