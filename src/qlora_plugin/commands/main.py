"""The ``qlora`` command: a thin dispatcher over one module per subcommand.

Only argparse runs at start-up; torch, transformers and bitsandbytes are
imported by the subcommand that needs them (``presets``, ``check``,
``convert-finlora`` and ``inspect``/``estimate`` on a common decoder's config
never import them). Third-party warnings stay out of the output unless
``--verbose``. Bad input exits 2 and a failed run 1, each with one line on
stderr; SIGINT, SIGTERM and SIGHUP end a run with one line too, after its
temporary files are removed.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

from qlora_plugin import __version__
from qlora_plugin.commands.options import OneLineParser
from qlora_plugin.core.errors import QLoRAConfigError
from qlora_plugin.core.safe_io import Interrupted, is_disk_full, stop_signals_raise
from qlora_plugin.tools.console import quiet_third_party

EXIT_BAD_INPUT, EXIT_FAILED = 2, 1
SUBCOMMANDS = {
    "presets": "presets",
    "inspect": "inspect",
    "estimate": "estimate",
    "check": "check",
    "merge": "merge",
    "export": "export",
    "convert-finlora": "convert_finlora",
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``qlora``: each subcommand module adds its own."""
    import importlib

    parser = OneLineParser(prog="qlora", description="QLoRA recipes for TRL and Axolotl.")
    parser.add_argument("--version", action="version", version=f"qlora-plugin {__version__}")
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="show the warnings of torch, transformers, bitsandbytes and other libraries",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in SUBCOMMANDS.values():
        importlib.import_module(f"qlora_plugin.commands.{module}").register(commands)
    return parser


def run(args: argparse.Namespace) -> int:
    """Run the parsed subcommand."""
    import importlib

    return int(importlib.import_module(f"qlora_plugin.commands.{SUBCOMMANDS[args.command]}").run(args))


def main(argv: list[str] | None = None) -> int:
    """Run ``qlora``; returns the exit status (2 for bad input, with the fix on stderr; 1 if the work failed)."""
    args = build_parser().parse_args(argv)
    quiet_third_party(verbose=args.verbose)
    name = f"qlora {args.command}"
    arrived: list[int] = []
    try:
        with stop_signals_raise(arrived):
            return run(args)
    except (QLoRAConfigError, FileNotFoundError, FileExistsError, NotADirectoryError) as error:
        if arrived:
            return _stopped(name, arrived[0])
        print(f"{name}: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (KeyboardInterrupt, Interrupted) as stop:
        return _stopped(name, stop.signum if isinstance(stop, Interrupted) else signal.SIGINT)
    except Exception as error:
        if arrived:  # the signal's exception was turned into another one on its way out
            return _stopped(name, arrived[0])
        if os.environ.get("QLORA_TRACEBACK"):
            raise
        if is_disk_full(error):
            print(
                f"{name}: failed: the disk is full, or a file-size limit was reached ({_one_line(error)}); "
                "nothing was written. Fix: free space where the output goes, or write it elsewhere",
                file=sys.stderr,
            )
        else:
            print(
                f"{name}: failed: {type(error).__name__}: {_one_line(error)} "
                "(nothing was written; set QLORA_TRACEBACK=1 for the traceback)",
                file=sys.stderr,
            )
        return EXIT_FAILED


def _stopped(name: str, signum: int) -> int:
    print(
        f"{name}: stopped by {signal.Signals(signum).name}; nothing was written (temporary files removed)",
        file=sys.stderr,
    )
    return 128 + signum


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


if __name__ == "__main__":
    sys.exit(main())
