"""What every command shares: the parser, flag types, common flags, and reading the files that arguments name.

Flags hold no defaults of their own: each default is read from the library object that owns it
(a config dataclass field, a library function's parameter or a named constant), and ``--help`` prints it.
The checks made before a model loads are the library's (:mod:`emlens.validation`).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from emlens.models import DEFAULT_MODEL, DTYPES, check_device, default_device
from emlens.study.config import ModelSection
from emlens.validation import ConfigError, check_float, check_int, check_seed

EXIT_USER_ERROR = 2
EXIT_JUDGE_FAILED = 3
EXIT_INTERRUPTED = 130


class UsageError(Exception):
    """A command line that argparse rejected (unknown flag, bad value, missing argument)."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default (``(default: …)``) unless it has none or its help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        # identity, not ==: 0 and 0.0 equal False, and a default of 0 (--kl-weight, --seed) must still show
        if "%(default)" in text or any(action.default is x for x in (None, argparse.SUPPRESS, False)) or action.required:
            return text
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` that reports mistakes as one line instead of usage + exit."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message} (see `{self.prog} --help`)")


def default_of(owner: Any, name: str) -> Any:
    """The default of field ``name`` of a dataclass, or of parameter ``name`` of a function: where a flag's default comes from."""
    if not dataclasses.is_dataclass(owner):
        return inspect.signature(owner).parameters[name].default
    f = next((f for f in dataclasses.fields(owner) if f.name == name), None)
    if f is None:
        raise KeyError(f"{owner} has no field {name!r}")
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc,operator]


Flags = dict[str, tuple[str, Callable[[str], Any], str]]  # "--flag": (the owner's field or parameter, type, help)


def add_flags(p: argparse.ArgumentParser, owner: Any, flags: Flags) -> None:
    """Flags whose defaults are ``owner``'s (a config dataclass or a library function)."""
    for flag, (name, kind, text) in flags.items():
        p.add_argument(flag, type=kind, default=default_of(owner, name), help=text)


def values_of(args: argparse.Namespace, flags: Flags) -> dict[str, Any]:
    """The parsed values of ``flags``, keyed by the owner's names (ready for its constructor)."""
    return {name: getattr(args, flag[2:].replace("-", "_")) for flag, (name, _, _) in flags.items()}


# --- flag types: parse the text, then check it with emlens.validation -------------


def flag_type(parse: Callable[[str], Any], check: Callable[..., Any], **bounds: Any) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        try:
            value = parse(text)
        except ValueError:
            value = text  # not even a number: the check below says what is expected
        try:
            return check("value", value, **bounds)
        except ConfigError as err:
            raise argparse.ArgumentTypeError(f"must be {err.requirement}, got {text!r}") from None

    convert.__name__ = getattr(check, "__name__", "value")
    return convert


positive_int = flag_type(int, check_int, minimum=1)
nonnegative_int = flag_type(int, check_int, minimum=0)
at_least_two = flag_type(int, check_int, minimum=2)
seed_value = flag_type(int, check_seed)
positive_float = flag_type(float, check_float, minimum=0, exclusive_min=True)
nonnegative_float = flag_type(float, check_float, minimum=0)
finite_float = flag_type(float, check_float)
unit_interval = flag_type(float, check_float, minimum=0, maximum=1)
open_unit_interval = flag_type(float, check_float, minimum=0, exclusive_min=True, maximum=1)


def device_name(text: str) -> str:
    """A device this machine has (``cpu``, ``cuda``, ``cuda:N``, ``mps``)."""
    try:
        check_device(text)
    except ConfigError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


# --- flags shared by several commands ---------------------------------------------------


def add_debug(parser: argparse.ArgumentParser, default: Any) -> None:
    parser.add_argument("--debug", action="store_true", default=default, help="show the full traceback when a command fails")


def add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help="hub name, local checkpoint, .gguf file, or the embedded default model")
    p.add_argument("--device", type=device_name, default=default_device(), help="where the model runs (cpu, cuda, cuda:N, mps)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=default_of(ModelSection, "dtype"), help="the model's weights and activations")


def add_allow_other_model(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--allow-other-model",
        action="store_true",
        help="no warning when a saved intervention was trained on a model of another name (same shapes)",
    )


def add_named_interventions(p: argparse.ArgumentParser) -> None:
    p.add_argument("interventions", nargs="+", help="NAME=PATH.safetensors (or just PATH) for each solution")
    add_allow_other_model(p)


def add_figure_out(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--out",
        required=True,
        help="figure path (.png is added when there is no suffix); a .json with every number is written beside it",
    )


# --- arguments that name files -------------------------------------------------------


def load_interventions(paths: dict[str, Path], device: str) -> dict[str, Any]:
    from emlens.interventions import Intervention

    return {name: Intervention.load(path, device=device) for name, path in paths.items()}


def load_optional(path: str | None, device: str) -> Any:
    """The intervention saved at ``path``, or ``None`` (the base model) when no path is given."""
    from emlens.interventions import Intervention

    return Intervention.load(path, device=device) if path else None


def load_model_of(args: argparse.Namespace) -> Any:
    from emlens.models import load_model

    return load_model(args.model, device=args.device, dtype=DTYPES[args.dtype])
