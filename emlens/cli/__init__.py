"""Command line: ``emlens reproduce`` runs the paper's whole study; the other commands are its parts.

Every flag is checked where it enters. A mistake in the input (a bad flag value, a missing or
malformed data file, an output that would clobber a run) ends with a one-line
``emlens: error: ...`` on stderr and exit code 2; ``--debug`` also prints the traceback. Other
failures (CUDA errors, out of memory, bugs) are not dressed up as input mistakes: they raise
with their traceback (exit code 1).

One module per command or group of commands; each parses its flags into the library's own
config objects and calls the library (:mod:`emlens.study`, :mod:`emlens.training`, ...). Flags
take their defaults from those objects.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import traceback
import warnings
from collections.abc import Callable, Iterator
from typing import Any

from emlens.cli import directions, evaluate, formats, measure, preference, reproduce, train
from emlens.cli.flags import EXIT_INTERRUPTED, EXIT_JUDGE_FAILED, EXIT_USER_ERROR, Parser, UsageError, add_debug
from emlens.models import ModelLoadError

__all__ = ["EXIT_JUDGE_FAILED", "EXIT_USER_ERROR", "EXIT_INTERRUPTED", "build_parser", "main"]

MODULES = (reproduce, train, measure, preference, evaluate, directions, formats)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("emlens")
    except PackageNotFoundError:  # pragma: no cover
        return "unknown (not installed)"


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, Callable[[argparse.Namespace], int]]]:
    parser = Parser(prog="emlens", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"emlens {_version()}")
    add_debug(parser, False)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    commands: dict[str, Callable[[argparse.Namespace], int]] = {}

    def add(name: str, handler: Callable[[argparse.Namespace], int], **kwargs: Any) -> argparse.ArgumentParser:
        p = sub.add_parser(name, **kwargs)
        add_debug(p, argparse.SUPPRESS)  # `emlens CMD ... --debug` works too
        commands[name] = handler
        return p

    for module in MODULES:
        module.register(add)
    return parser, commands


def user_error_types() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "change the input": shown as one line, exit code 2.

    ``ValueError`` covers :class:`~emlens.validation.ConfigError`,
    :class:`~emlens.data.DataFormatError` and the intervention errors; ``OSError`` covers
    missing, unreadable or unwritable files. ``RuntimeError`` (CUDA errors, out of
    memory) is deliberately absent, apart from :class:`~emlens.models.ModelLoadError`.
    """
    types: list[type[BaseException]] = [ValueError, OSError, ModelLoadError]
    openai = sys.modules.get("openai")
    if openai is not None and hasattr(openai, "OpenAIError"):
        types.append(openai.OpenAIError)  # e.g. no API key, unreachable judge URL
    return tuple(types)


def one_line(err: BaseException) -> str:
    text = " ".join(part.strip() for part in str(err).splitlines() if part.strip())
    return text or type(err).__name__


def judge_failed(args: argparse.Namespace, err: BaseException, kept: str) -> int:
    """After a judge failure: the error in one line (the traceback with --debug), where the work so far is kept, exit 3."""
    if getattr(args, "debug", False):
        traceback.print_exc()
    print(f"emlens: error: {one_line(err)}", file=sys.stderr)
    print(f"emlens: {kept}", file=sys.stderr)
    return EXIT_JUDGE_FAILED


@contextlib.contextmanager
def _tidy_warnings(args: argparse.Namespace) -> Iterator[None]:
    """Warnings print once each as ``emlens: warning: ...`` (in Python's usual form with --debug)."""
    shown: set[str] = set()

    def show(
        message: Warning | str, category: type[Warning], filename: str, lineno: int, file: Any = None, line: str | None = None
    ) -> None:
        text = one_line(message) if isinstance(message, BaseException) else str(message)
        if category.__name__ == "ModelMismatchWarning" and hasattr(args, "allow_other_model"):
            text = text.replace("allow_other_model=True", "--allow-other-model")
        if text not in shown:
            shown.add(text)
            print(f"emlens: warning: {text}", file=sys.stderr)

    with warnings.catch_warnings():
        if not args.debug:
            warnings.showwarning = show
        if getattr(args, "allow_other_model", False):
            from emlens.interventions import ModelMismatchWarning

            warnings.simplefilter("ignore", ModelMismatchWarning)
        yield


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (2 for a mistake in the input)."""
    parser, commands = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as err:
        print(f"emlens: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    with _tidy_warnings(args):
        try:
            return commands[args.command](args)
        except KeyboardInterrupt:
            if args.debug:
                traceback.print_exc()
            print("emlens: interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED
        except user_error_types() as err:
            if args.debug:
                traceback.print_exc()
            print(f"emlens: error: {one_line(err)}", file=sys.stderr)
            return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
