"""The ``hf-wemoe`` sub-commands: name, module and one-line help, without importing any command.

The top-level parser lists the commands from this table; only the invoked command's module is imported (to add
its flags and run it), so ``hf-wemoe --help`` answers without loading torch or transformers. Each module
(``hf_wemoe.cli.<module>``) defines ``DESCRIPTION``, ``EXAMPLES``, ``add_arguments(parser)`` and
``run(args) -> int``; it parses options, calls a workflow, pushes when asked, and prints.
"""

from __future__ import annotations

from typing import NamedTuple


class Command(NamedTuple):
    """One sub-command: its name on the command line, its module in `hf_wemoe.cli`, its one-line help."""

    name: str
    module: str
    help: str


# The order here is the order ``hf-wemoe --help`` lists the commands in.
COMMANDS: dict[str, Command] = {
    command.name: command
    for command in (
        Command(
            "demo", "demo", "run the whole method offline on the built-in toy zoo and print the results table"
        ),
        Command(
            "merge",
            "merge",
            "merge fine-tuned CLIP vision experts (WEMoE, E-WEMoE, task arithmetic, TIES, averaging)",
        ),
        Command(
            "analyze",
            "analyze",
            "measure the experts' task vectors per layer and module: relative size, and the rank that keeps their energy",
        ),
        Command(
            "train",
            "train",
            "adapt the routers of a WEMoE model on unlabelled data (test-time adaptation, collapse monitored)",
        ),
        Command(
            "calibrate",
            "calibrate",
            "set the routers of a WEMoE model from a few unlabelled images per task, without training",
        ),
        Command(
            "eval",
            "eval",
            "evaluate a WEMoE model or a plain CLIP vision model (zero-shot heads, top-1 accuracy)",
        ),
        Command(
            "push",
            "push",
            "push a merged or adapted model folder to the Hugging Face Hub, with its model card",
        ),
        Command(
            "toy-zoo",
            "toy_zoo",
            "build the offline toy zoo: small image tasks, a tiny pretrained CLIP and one expert per task",
        ),
        Command(
            "env", "env", "print versions, devices and cache locations for a bug report"
        ),
    )
}

__all__ = ["COMMANDS", "Command"]
