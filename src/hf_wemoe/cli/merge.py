"""``hf-wemoe merge``: build a WEMoE / E-WEMoE model, or a static merge, from a base and its experts."""

from __future__ import annotations

import argparse

from hf_wemoe.merging.recipe import add_arguments

DESCRIPTION = """\
Merge CLIP vision experts fine-tuned from one base model. The default method, wemoe, writes a
weight-ensembling mixture-of-experts model (config, safetensors weights, model code, preprocessor config,
merge_config.yaml and a model card) that AutoModel loads with trust_remote_code=True; the static methods
write a plain CLIPVisionModel. REF is a Hub repo id with an optional @revision (org/name@revision) or a
local folder; checkpoints may be CLIPVisionModel (transformers 4 or 5 layout) or full CLIPModel.
"""

EPILOG = """\
example:
  hf-wemoe merge --base openai/clip-vit-base-patch32 \\
      --expert mnist=tanganke/clip-vit-base-patch32_mnist \\
      --expert svhn=tanganke/clip-vit-base-patch32_svhn --output wemoe-vit-b32
  hf-wemoe merge --config wemoe-vit-b32/merge_config.yaml --output rebuilt   # same weights again
  hf-wemoe merge --base openai/clip-vit-base-patch32 --expert ... --output wemoe-clip --full-clip \\
      --push-to-hub my-org/wemoe-clip       # zero-shot pipelines and widget, pushed with its card
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "merge",
        help="merge fine-tuned CLIP vision experts (WEMoE, E-WEMoE, task arithmetic, TIES, averaging)",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars (default: off)")
    return parser


def run(args: argparse.Namespace) -> int:
    from hf_wemoe.merging.recipe import options_from_args
    from hf_wemoe.workflows.merge import run_merge

    summary = run_merge(options_from_args(args), show_progress=False if args.quiet else None)
    print(summary.line())
    if summary.push is not None:
        print(summary.push.line())
    return 0
