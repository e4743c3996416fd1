"""The ``hf-wemoe`` command line: argument parsing, dispatch, exit codes."""

from __future__ import annotations

import argparse
import importlib
import sys

from hf_wemoe.cli.commands import COMMANDS
from hf_wemoe.errors import WEMoEError
from hf_wemoe.utils.progress import quiet_libraries, set_verbosity
from hf_wemoe.version import __version__


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one sub-parser per command module in ``hf_wemoe.cli``."""
    parser = argparse.ArgumentParser(
        prog="hf-wemoe",
        description=(
            "Merge CLIP vision models fine-tuned on different tasks into one weight-ensembling "
            "mixture-of-experts (WEMoE / E-WEMoE) model, adapt its routers, evaluate it and share it on the Hub."
        ),
    )
    parser.add_argument("--version", action="version", version=f"hf-wemoe {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="show hf-wemoe's debug logging (other libraries stay quiet)"
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        module = importlib.import_module(f"hf_wemoe.cli.{name}")
        sub = module.add_parser(subparsers)
        sub.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    set_verbosity(quiet=getattr(args, "quiet", False), verbose=args.verbose)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        with quiet_libraries(show_progress=None):
            return int(args._run(args) or 0)
    except WEMoEError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
