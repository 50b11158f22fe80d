"""Small checks for settings, shared by ``TrainConfig``, the data readers and the CLI.

Every check raises :class:`ConfigError` (a ``ValueError``) whose message names the
setting, what it must be and the value it got, e.g.
``batch_size must be an integer >= 1, got 0``.

A public parameter that its function checks with these (a data reader's ``limit`` or
``max_length``) is annotated ``object``: the function takes any value and refuses a bad one
with the :class:`ConfigError` that names it. The narrower type is in its docstring; as an
annotation it would let a runtime type checker (the test suite runs beartype on every emlens
function) refuse the value first, with its own message instead of ours.
"""

from __future__ import annotations

import glob
import math
import os
from collections.abc import Callable, Collection, Mapping
from numbers import Integral, Real
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

# torch.manual_seed accepts seeds in [-2**63, 2**64); we ask for the common
# non-negative part so a seed also works for other generators (random, numpy).
MAX_SEED = 2**63 - 1


class ConfigError(ValueError):
    """A setting has the wrong type or lies outside its allowed range.

    ``setting`` is the name of the setting (``"lr"``, ``"--batch-size"``), ``requirement``
    what it must be (``"a finite number > 0"``) and ``value`` the rejected value.
    """

    def __init__(
        self,
        message: str,
        *,
        setting: str | None = None,
        requirement: str | None = None,
        value: Any = None,
    ) -> None:
        super().__init__(message)
        self.setting = setting
        self.requirement = requirement
        self.value = value


def _fail(name: str, requirement: str, value: Any) -> ConfigError:
    return ConfigError(
        f"{name} must be {requirement}, got {value!r}",
        setting=name,
        requirement=requirement,
        value=value,
    )


def _number_text(x: float | int) -> str:
    return str(x) if isinstance(x, int) else f"{x:g}"


def _range_text(
    minimum: float | int | None,
    maximum: float | int | None,
    exclusive_min: bool = False,
    exclusive_max: bool = False,
) -> str:
    parts = []
    if minimum is not None:
        parts.append(f"{'>' if exclusive_min else '>='} {_number_text(minimum)}")
    if maximum is not None:
        parts.append(f"{'<' if exclusive_max else '<='} {_number_text(maximum)}")
    closed = not (exclusive_min or exclusive_max)
    if minimum is not None and maximum is not None and closed:
        return f"in [{_number_text(minimum)}, {_number_text(maximum)}]"
    return " and ".join(parts)


def _is_int(value: Any) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def check_int(
    name: str,
    value: Any,
    *,
    minimum: int | None = None,
    maximum: int | None = None,
) -> int:
    """Return ``value`` as an ``int`` if it is an integer (not a bool) within the bounds."""
    limits = _range_text(minimum, maximum)
    requirement = f"an integer {limits}".rstrip()
    if not _is_int(value):
        raise _fail(name, requirement, value)
    number = int(value)
    if (minimum is not None and number < minimum) or (maximum is not None and number > maximum):
        raise _fail(name, requirement, value)
    return number


def check_optional_int(
    name: str,
    value: Any,
    *,
    minimum: int | None = None,
    maximum: int | None = None,
) -> int | None:
    """Like :func:`check_int`, but ``None`` is allowed (and returned)."""
    if value is None:
        return None
    try:
        return check_int(name, value, minimum=minimum, maximum=maximum)
    except ConfigError as err:
        raise _fail(name, f"None or {err.requirement}", value) from None


def check_float(
    name: str,
    value: Any,
    *,
    minimum: float | int | None = None,
    maximum: float | int | None = None,
    exclusive_min: bool = False,
    exclusive_max: bool = False,
    finite: bool = True,
) -> float:
    """Return ``value`` as a ``float`` if it is a real number (not a bool or a string) within the bounds.

    With ``finite`` (the default) NaN and infinities are refused; NaN is refused always.
    """
    limits = _range_text(minimum, maximum, exclusive_min, exclusive_max)
    requirement = f"{'a finite' if finite else 'a'} number {limits}".rstrip()
    if not _is_real(value):
        raise _fail(name, requirement, value)
    number = float(value)
    if math.isnan(number) or (finite and math.isinf(number)):
        raise _fail(name, requirement, value)
    too_low = minimum is not None and (number <= minimum if exclusive_min else number < minimum)
    too_high = maximum is not None and (number >= maximum if exclusive_max else number > maximum)
    if too_low or too_high:
        raise _fail(name, requirement, value)
    return number


def check_optional_float(name: str, value: Any, **bounds: Any) -> float | None:
    """Like :func:`check_float`, but ``None`` is allowed (and returned)."""
    if value is None:
        return None
    try:
        return check_float(name, value, **bounds)
    except ConfigError as err:
        raise _fail(name, f"None or {err.requirement}", value) from None


def check_grid(name: str, values: Any, **bounds: Any) -> list[float]:
    """A grid of numbers (ε, norms, λ) checked, in the order given, with duplicates refused.

    A duplicate would be a second, identical point; it is refused so that no table or plot
    holds one setting twice.
    """
    if isinstance(values, (str, bytes)) or not isinstance(values, Collection):
        raise _fail(name, "a list of numbers", values)
    grid = [check_float(f"{name} value", v, **bounds) for v in values]
    if not grid:
        raise _fail(name, "a non-empty list of numbers", values)
    repeated = sorted({v for v in grid if grid.count(v) > 1})
    if repeated:
        raise ConfigError(
            f"{name} lists {', '.join(_number_text(v) for v in repeated)} more than once; give each value once",
            setting=name,
            requirement="distinct values",
            value=values,
        )
    return grid


def check_bool(name: str, value: Any) -> bool:
    """Return ``value`` if it is ``True`` or ``False`` (not 0/1, not a string)."""
    if not isinstance(value, bool):
        raise _fail(name, "True or False", value)
    return value


def check_choice(name: str, value: T, choices: Collection[T]) -> T:
    """Return ``value`` if it is one of ``choices``."""
    try:
        ok = value in choices
    except TypeError:  # an unhashable value tested against a set
        ok = False
    if not ok:
        listed = ", ".join(repr(c) for c in sorted(choices, key=repr))
        raise _fail(name, f"one of {listed}", value)
    return value


def check_seed(name: str, value: Any) -> int:
    """A random seed: an integer in ``[0, 2**63 - 1]``."""
    return check_int(name, value, minimum=0, maximum=MAX_SEED)


def check_n_samples(n_samples: object) -> int:
    """Refuse a sample count that would leave nothing to judge (0, negative, or not an integer)."""
    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
        raise ValueError(f"n_samples must be a positive integer, got {n_samples!r}: with no samples every rate is undefined")
    return n_samples


# --- TrainConfig ------------------------------------------------------------------


def _int_at_least(minimum: int) -> Callable[[str, Any], Any]:
    return lambda name, value: check_int(name, value, minimum=minimum)


def _optional_int_at_least(minimum: int) -> Callable[[str, Any], Any]:
    return lambda name, value: check_optional_int(name, value, minimum=minimum)


def _finite_above_zero(name: str, value: Any) -> float:
    return check_float(name, value, minimum=0, exclusive_min=True)


def _finite_at_least_zero(name: str, value: Any) -> float:
    return check_float(name, value, minimum=0)


TRAIN_SETTING_CHECKS: Mapping[str, Callable[[str, Any], Any]] = {
    "lr": _finite_above_zero,
    "epochs": _finite_above_zero,
    "max_steps": _optional_int_at_least(1),
    "batch_size": _int_at_least(1),
    "grad_accum": _int_at_least(1),
    "warmup_steps": _int_at_least(0),
    "weight_decay": _finite_at_least_zero,
    "max_length": _int_at_least(1),
    "kl_weight": _finite_at_least_zero,
    "kl_batch_size": _int_at_least(1),
    "checkpoint_every": _int_at_least(1),
    "seed": check_seed,
    "progress": check_bool,
    "cache_prefix": check_bool,
}
"""The check for each known training setting (name -> ``check(name, value)``)."""


def validate_train_settings(**settings: Any) -> None:
    """Check the given training settings by name; unknown names are left alone.

    Raises :class:`ConfigError` naming the first bad setting and its allowed range.
    """
    for name, value in settings.items():
        check = TRAIN_SETTING_CHECKS.get(name)
        if check is not None:
            check(name, value)


def validate_train_config(config: Any) -> None:
    """Check every known training setting that ``config`` has (e.g. a ``TrainConfig``).

    Meant to be called from ``TrainConfig.__post_init__``: it reads the attributes
    only and changes nothing. Raises :class:`ConfigError`, e.g.
    ``lr must be a finite number > 0, got 'fast'``.
    """
    present = {name: getattr(config, name) for name in TRAIN_SETTING_CHECKS if hasattr(config, name)}
    validate_train_settings(**present)


# --- output paths, checked before any model is loaded (``flag`` names the setting in messages) ---


def check_writable_parent(path: Path, flag: str) -> None:
    """The nearest existing ancestor of ``path`` must be a writable directory."""
    ancestor = path.absolute().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ConfigError(f"{flag} {path}: {ancestor} is a file, so the output cannot be created there")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {path}: no permission to write in {ancestor}")


def with_file_suffix(path: str | Path, suffix: str) -> Path:
    """``path`` ending in ``suffix``: as given when it does, else with ``suffix`` appended (``kl=6.6`` becomes
    ``kl=6.6.safetensors``; replacing its "suffix" ``.6`` would write ``kl=6.6`` and ``kl=6.9`` to one file)."""
    path = Path(path)
    return path if path.suffix == suffix else path.with_name(path.name + suffix)


def check_output_file(path: str | Path, flag: str = "--out", suffix: str | None = None) -> Path:
    """An output file path: not a directory, and creatable. ``suffix`` is added when the path has none."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{flag} {path} is a directory; give a file path")
    if suffix is not None and not path.suffix:
        path = path.with_suffix(suffix)
    if path.is_dir():
        raise ConfigError(f"{flag} {path} is a directory; give a file path")
    check_writable_parent(path, flag)
    return path


FIGURE_SUFFIXES = (".png", ".pdf", ".svg", ".jpg", ".jpeg", ".eps", ".ps", ".tif", ".tiff", ".webp")


def check_figure_file(path: str | Path, flag: str = "--out") -> Path:
    """A figure path whose numbers go to the JSON beside it (``x.png`` → ``x.json``). ``.png`` is appended when the
    path does not end in an image suffix (``kl=6.6`` becomes ``kl=6.6.png``: its "suffix" ``.6`` is no format, and
    the plot would fail after all the work). Refused when that JSON would replace the numbers of another figure with
    the same stem (``x.pdf`` written earlier): the earlier figure would be left without its numbers."""
    path = check_output_file(path, flag)
    if path.suffix.lower() == ".json":
        raise ConfigError(f"{flag} {path}: the figure's numbers are written to {path.name} beside it; give an image path (.png, .pdf, ...)")
    if path.suffix.lower() not in FIGURE_SUFFIXES:
        path = check_output_file(with_file_suffix(path, ".png"), flag)
    if path.with_suffix(".json").exists():
        others = sorted(
            p.name
            for p in path.parent.glob(f"{glob.escape(path.stem)}.*")
            if p.stem == path.stem and p.suffix.lower() in FIGURE_SUFFIXES and p.name != path.name
        )
        if others:
            raise ConfigError(
                f"{flag} {path}: {path.with_suffix('.json')} holds the numbers of {', '.join(others)}, which this run would "
                "overwrite; give the figure another name, or delete them"
            )
    return path


def check_out_dir(out: str | Path, what: str = "answers, judgements and figures", flag: str = "--out") -> Path:
    """An output directory (created later): not a file, and creatable."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{flag} {out} is a file; give a directory ({what} are written there)")
    check_writable_parent(out / "results.json", flag)
    return out


def named_paths(specs: list[str], reserved: tuple[str, ...] = (), reserved_prefix: str = "") -> dict[str, Path]:
    """``NAME=PATH`` (or ``PATH``) arguments as names to intervention files: a missing file, a folder, a name given
    twice, one of ``reserved`` or one starting with ``reserved_prefix`` (any case) is refused."""
    out: dict[str, Path] = {}
    for spec in specs:
        # NAME=PATH: names and paths may both hold "=", so split where the rest is an existing file
        # (an existing file alone is a PATH; otherwise the first "=" splits, and the missing file is named)
        splits = [i for i, ch in enumerate(spec) if ch == "="]
        at = next((i for i in splits if Path(spec[i + 1 :]).is_file()), splits[0] if splits else None)
        name, path_text = ("", spec) if Path(spec).is_file() or at is None else (spec[:at], spec[at + 1 :])
        path = Path(path_text)
        name = name or path.stem
        if not path_text:
            raise ConfigError(f"{spec!r}: no file after '='; use NAME=PATH.safetensors")
        if path.is_dir():
            raise ConfigError(f"{path} is a directory; give an intervention .safetensors file")
        if not path.is_file():
            raise FileNotFoundError(f"no intervention file at {path}")
        if name in out:
            raise ConfigError(f"the name {name!r} is given twice ({out[name]} and {path}); give each solution its own NAME=PATH")
        if name in reserved:
            raise ConfigError(f"the name {name!r} is reserved here ({reserved[0]!r} labels a built-in row); pick another NAME")
        if reserved_prefix and name.lower().startswith(reserved_prefix):
            raise ConfigError(
                f"the name {name!r} starts with {reserved_prefix!r}, which marks the random baselines in results and figures; "
                f"give the file another name with NAME=PATH (e.g. solution={path})"
            )
        out[name] = path
    return out


def check_run_dir(out: str | Path, resume: str | Path | None, overwrite: bool) -> Path:
    """A training run's directory: refuse a file, or another run's non-empty directory.

    A non-empty ``out`` is allowed when it is the run being resumed or with ``overwrite``.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a directory for the run (it is created if missing)")
    if out.is_dir():
        entries = sorted(p.name for p in out.iterdir() if p.name != ".lock")
        resuming_here = resume is not None and Path(resume).resolve() == out.resolve()
        if entries and not (resuming_here or overwrite):
            shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
            raise ConfigError(
                f"--out {out} already holds files ({shown}); choose a new directory, "
                f"pass --resume {out} to continue that run, or --overwrite to write "
                "over it"
            )
    check_writable_parent(out, "--out")
    return out


__all__ = [
    "named_paths",
    "check_n_samples",
    "MAX_SEED",
    "TRAIN_SETTING_CHECKS",
    "ConfigError",
    "check_bool",
    "check_choice",
    "check_float",
    "check_int",
    "check_optional_float",
    "check_optional_int",
    "check_out_dir",
    "check_output_file",
    "check_run_dir",
    "check_seed",
    "check_writable_parent",
    "validate_train_config",
    "validate_train_settings",
]
