"""``hf-wemoe push``: upload a model folder to a Hub model repo in one commit, with its model card."""

from __future__ import annotations

import argparse

DESCRIPTION = """\
Push a model folder written by hf-wemoe merge or train (weights, model code, preprocessor config, tokenizer files
of full CLIP models, merge_config.yaml, eval_results.json and routing.png when present) to a Hub model repo, in a
single commit. The folder is loaded and run once first, so a broken folder is refused before anything is sent.
The repo is created when missing; files of an earlier push that the folder no longer has are removed in the same
commit. The model card (README.md) is rendered for the repo id from what the folder records (sources and their
commits, merge options, adaptation, accuracy) unless --keep-card is given. Needs a token with write access
(`hf auth login` or HF_TOKEN).
"""

EPILOG = """\
examples:
  hf-wemoe push wemoe-vit-b32-tta --repo-id my-org/wemoe-vit-b32
  hf-wemoe push wemoe-vit-b32 --repo-id my-org/wemoe-vit-b32 --branch untrained --private
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "push",
        help="push a merged or adapted model folder to the Hugging Face Hub, with its model card",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("folder", metavar="DIR", help="the model folder to push")
    parser.add_argument(
        "--repo-id", required=True, metavar="ORG/NAME", help="the Hub model repo (created when missing)"
    )
    parser.add_argument("--private", action="store_true", help="create the repo as private (default: public)")
    parser.add_argument(
        "--branch", metavar="B", help="commit to this branch, created from main when missing (default: main)"
    )
    parser.add_argument(
        "--commit-message", metavar="M", help="the commit title (default: says what is pushed)"
    )
    parser.add_argument(
        "--keep-card",
        action="store_true",
        help="upload the folder's README.md as it is instead of rendering the model card for the repo id",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars (default: off)")
    return parser


def run(args: argparse.Namespace) -> int:
    from hf_wemoe.hub.push import push_folder

    result = push_folder(
        args.folder,
        args.repo_id,
        private=args.private,
        branch=args.branch,
        commit_message=args.commit_message,
        keep_card=args.keep_card,
        show_progress=False if args.quiet else None,
    )
    print(result.line())
    print(result.url)
    return 0
