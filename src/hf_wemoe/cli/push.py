"""``hf-wemoe push``: upload a model folder to a Hub model repo in one commit, with its model card.

Also the ``--push-to-hub`` options that ``merge`` and ``train`` compose with their workflows: the repo id and the
token are checked before the work starts, and the finished folder is pushed after it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from hf_wemoe.cli.options import add_options, resolve_options
from hf_wemoe.errors import WEMoEError
from hf_wemoe.hub.push import PushResult, check_repo_id, check_token, push_folder

DESCRIPTION = """\
Push a model folder written by hf-wemoe merge or train (weights, model code, preprocessor config, tokenizer files
of full CLIP models, merge_config.yaml, eval_results.json and routing.png when present) to a Hub model repo, in a
single commit. The folder is loaded and run once first, so a broken folder is refused before anything is sent.
The repo is created when missing; files of an earlier push that the folder no longer has are removed in the same
commit. The model card (README.md) is rendered for the repo id from what the folder records (sources and their
commits, merge options, adaptation, accuracy) unless --keep-card is given. Needs a token with write access
(`hf auth login` or HF_TOKEN).
"""

EXAMPLES = """\
examples:
  hf-wemoe push wemoe-vit-b32-tta --repo-id my-org/wemoe-vit-b32
  hf-wemoe push wemoe-vit-b32 --repo-id my-org/wemoe-vit-b32 --branch untrained --private
"""


class PushOptions(BaseModel):
    """`hf-wemoe push` options."""

    model_config = ConfigDict(extra="forbid")

    folder: Path = Field(
        description="the model folder to push", json_schema_extra={"positional": True, "metavar": "DIR"}
    )
    repo_id: str = Field(
        description="the Hub model repo (created when missing)", json_schema_extra={"metavar": "ORG/NAME"}
    )
    private: bool = Field(
        False, description="create the repo as private (an existing repo keeps its visibility)"
    )
    branch: str | None = Field(
        None,
        description="commit to this branch, created from main when missing",
        json_schema_extra={"metavar": "B", "default_text": "main"},
    )
    commit_message: str | None = Field(
        None,
        description="the commit title",
        json_schema_extra={"metavar": "M", "default_text": "says what is pushed"},
    )
    keep_card: bool = Field(
        False,
        description="upload the folder's README.md as it is instead of rendering the model card for the repo id",
    )


class PushToHubOptions(BaseModel):
    """`--push-to-hub` of the commands that write a model folder (merge, train)."""

    model_config = ConfigDict(extra="forbid")

    push_to_hub: str | None = Field(
        None,
        description="when the folder is written, push it to this Hub model repo (created when missing) in one "
        "commit, with its model card",
        json_schema_extra={"metavar": "ORG/NAME"},
    )
    private: bool = Field(False, description="create the --push-to-hub repo as private")


def check_push_target(options: PushToHubOptions) -> None:
    """Refuse a malformed `--push-to-hub` repo id or a missing token before any work starts."""
    if options.push_to_hub:
        check_repo_id(options.push_to_hub)
        check_token()


def push_output(
    folder: Path, options: PushToHubOptions, done: str, show_progress: bool | None = None
) -> PushResult | None:
    """Push the written `folder` when `--push-to-hub` was given; `done` says what was written, for the error.

    Raises:
        WEMoEError: "<done>, but the push failed: <why> (retry with: hf-wemoe push <folder> --repo-id <repo>)";
            the folder is kept.
    """
    if not options.push_to_hub:
        return None
    try:
        return push_folder(folder, options.push_to_hub, private=options.private, show_progress=show_progress)
    except WEMoEError as err:
        raise WEMoEError(
            f"{done}, but the push failed: {err} (retry with: hf-wemoe push {folder} --repo-id {options.push_to_hub})"
        ) from err


def print_adapted(
    line: str, result, baseline, names: tuple[str, str], output: Path | None, pushed: PushResult | None
) -> None:
    """What `train` and `calibrate` print: the summary line, the before/after accuracy table (`names`), where the
    folder is and what was pushed."""
    from hf_wemoe.evaluation import markdown_table

    print(line)
    if result is not None:
        rows = [(names[1], result.accuracy)]
        if baseline is not None:
            rows.insert(0, (names[0], baseline.accuracy))
        print(markdown_table(rows, list(result.accuracy)))
    print(f"saved to {output}")
    if pushed is not None:
        print(pushed.line())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_options(parser, [PushOptions])


def run(args: argparse.Namespace) -> int:
    (options,) = resolve_options(args, PushOptions)
    result = push_folder(
        options.folder,
        options.repo_id,
        private=options.private,
        branch=options.branch,
        commit_message=options.commit_message,
        keep_card=options.keep_card,
        show_progress=False if args.quiet else None,
    )
    print(result.line())
    print(result.url)
    return 0
