"""Command line: ``cspine-submit <command> ...`` (also ``python -m cspine_submit``).

The subcommands live in :mod:`cspine_submit.commands`, one module each; this module only discovers them,
builds the parser and dispatches. Library functions return values; only the command modules print.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from cspine_submit import __version__, commands


def _command_modules():
    """Import every subcommand module, in the order their ``ORDER`` attribute gives (then by name)."""
    modules = [
        importlib.import_module(f"{commands.__name__}.{info.name}")
        for info in pkgutil.iter_modules(commands.__path__)
        if not info.name.startswith("_")
    ]
    return sorted(modules, key=lambda m: (getattr(m, "ORDER", 100), m.NAME))


def _get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cspine-submit",
        description="Offline cervical-spine fracture detection (RSNA 2022) and Kaggle submission.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in _command_modules():
        doc = (module.__doc__ or "").strip()
        command = sub.add_parser(
            module.NAME,
            help=module.HELP,
            description=doc or module.HELP,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(command)
        command.set_defaults(_run=module.run)
    return parser


INTERRUPTED_EXIT_S = 20.0
"""After Ctrl-C or SIGTERM (exit 130 / 143, everything written), the longest the interpreter's own exit may take."""


def exit_promptly_after_interrupt(code: int) -> None:
    """After an interrupt, make sure the process ends: the submission, journal and report are written and
    flushed; what remains is joining the reading workers' pool threads, which after an interrupt could wait for
    good (a queue feeder blocked on dead workers). A daemon timer ends the process with the run's code if so
    (``cspine-submit`` and ``make_submission.py`` alike). Only for a process of its own: not inside a notebook
    kernel or any other program calling :func:`main`, whose process must live on."""
    if code not in (130, 143) or "ipykernel" in sys.modules:
        return
    import os
    import threading

    sys.stdout.flush()
    sys.stderr.flush()
    timer = threading.Timer(INTERRUPTED_EXIT_S, os._exit, args=(code,))
    timer.daemon = True
    timer.start()


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; returns the process exit code."""
    args = _get_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except BrokenPipeError:
        # Output piped into `head` and closed early: not an error of ours. Point stdout at devnull so that the
        # interpreter's final flush does not raise again.
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def console_main() -> int:
    """The ``cspine-submit`` command: :func:`main`, then a process that ends promptly after an interrupt."""
    code = main()
    exit_promptly_after_interrupt(code)
    return code


if __name__ == "__main__":
    sys.exit(console_main())
