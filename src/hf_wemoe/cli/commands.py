"""One module per ``hf-wemoe`` sub-command.

Each module defines ``add_parser(subparsers)`` (registers its flags) and ``run(args) -> int``. The CLI only
parses arguments and dispatches; the work lives in the workflow modules the commands call.
"""

# The order here is the order ``hf-wemoe --help`` lists the commands in.
COMMANDS: list[str] = ["demo", "merge", "train", "eval", "push", "toy_zoo"]
