"""The ``hf-wemoe`` command line: argument parsing, dispatch, logging set-up, exit codes.

Only the invoked command's module is imported, so ``hf-wemoe --help`` and ``--version`` answer at once. Every
error, including a flag the parser does not know, is one line ``error: ...`` and exit code 2.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import sys
import warnings
from collections.abc import Iterator, Sequence

from hf_wemoe.cli.commands import COMMANDS
from hf_wemoe.cli.options import OptionParser, UsageError, add_logging_options
from hf_wemoe.errors import WEMoEError
from hf_wemoe.utils.progress import quiet_libraries, set_verbosity
from hf_wemoe.version import __version__

DESCRIPTION = """\
Merge CLIP vision models fine-tuned on different tasks into one weight-ensembling mixture-of-experts
(WEMoE / E-WEMoE) model, adapt its routers, evaluate it and share it on the Hub.

Flags are kebab-case (--max-shard-size); the underscore spelling (--max_shard_size) is accepted too. -q/--quiet
and -v/--verbose may come before or after the command. `hf-wemoe COMMAND --help` shows a command's flags."""

EXAMPLES = """\
examples:
  hf-wemoe demo                                  # the whole method offline, on the toy zoo
  hf-wemoe merge --base openai/clip-vit-base-patch32 --expert mnist=tanganke/clip-vit-base-patch32_mnist \\
      --expert svhn=tanganke/clip-vit-base-patch32_svhn --output wemoe-vit-b32
  hf-wemoe train --model wemoe-vit-b32 --task mnist=ylecun/mnist --task svhn=ufldl-stanford/svhn:cropped_digits \\
      --output wemoe-vit-b32-tta
  hf-wemoe push wemoe-vit-b32-tta --repo-id my-org/wemoe-vit-b32
"""


def build_parser(command: str | None = None) -> OptionParser:
    """The top-level parser, listing every command; only `command`'s module is imported, to add its flags."""
    parser = OptionParser(prog="hf-wemoe", description=DESCRIPTION, epilog=EXAMPLES)
    parser.add_argument("--version", action="version", version=f"hf-wemoe {__version__}")
    add_logging_options(parser, top_level=True)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OptionParser)
    for spec in COMMANDS.values():
        sub = subparsers.add_parser(spec.name, help=spec.help, description=spec.help)
        add_logging_options(sub)
        if spec.name == command:
            module = importlib.import_module(f"hf_wemoe.cli.{spec.module}")
            sub.description = module.DESCRIPTION
            sub.epilog = module.EXAMPLES
            module.add_arguments(sub)
            sub.set_defaults(_run=module.run, _parser=sub)
    return parser


def command_name(argv: Sequence[str]) -> str | None:
    """The command named in `argv` (the first word that is not a flag; top-level flags take no values)."""
    for token in argv:
        if token == "--":
            return None
        if token.startswith("-"):
            continue
        if token in COMMANDS:
            return token
        close = difflib.get_close_matches(token, list(COMMANDS), n=1)
        suggestion = f" (did you mean '{close[0]}'?)" if close else ""
        raise UsageError(
            f"unknown command '{token}'{suggestion}; choose one of: {', '.join(COMMANDS)} (see 'hf-wemoe --help')"
        )
    return None


@contextlib.contextmanager
def _one_line_warnings() -> Iterator[None]:
    """Show `FutureWarning`s (deprecated option names) as one `warning: ...` line on stderr."""
    with warnings.catch_warnings():
        show = warnings.showwarning

        def one_line(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001
            if issubclass(category, FutureWarning):
                print(f"warning: {message}", file=sys.stderr, flush=True)
            else:
                show(message, category, filename, lineno, file, line)

        warnings.showwarning = one_line
        yield


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        command = command_name(argv)
        parser = build_parser(command)
        args = parser.parse_args(argv)
    except WEMoEError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    set_verbosity(quiet=args.quiet, verbose=args.verbose)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        # Third-party output follows the package's progress policy while the command runs.
        with quiet_libraries(show_progress=None), _one_line_warnings():
            return int(args._run(args) or 0)
    except WEMoEError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
