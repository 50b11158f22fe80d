"""The library versions emlens' tests cover, and a clear warning outside them.

Generation through TransformerLens broke between transformers 5.17 and 5.24 without an
error; emlens now decodes on the plain transformers model, but the bridge's forward pass and
its hook names still depend on both libraries. These ranges match ``pyproject.toml``.
"""

from __future__ import annotations

import warnings
from importlib.metadata import PackageNotFoundError, version

TESTED = {"transformers": ((5, 17), (5, 25)), "transformer-lens": ((4, 3), (4, 4))}
_warned: set[str] = set()


class UntestedVersionWarning(UserWarning):
    """A library that emlens' numbers depend on is outside the tested range."""


def _release(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def check_versions() -> list[str]:
    """Warn (once per library) when an installed version is outside :data:`TESTED`; return the problems."""
    problems = []
    for name, (low, high) in TESTED.items():
        try:
            installed = version(name)
        except PackageNotFoundError:
            continue
        if not low <= _release(installed)[:2] < high:
            problem = (
                f"{name} {installed} is outside the range emlens is tested with "
                f"(>={'.'.join(map(str, low))},<{'.'.join(map(str, high))}); numbers may differ silently"
            )
            problems.append(problem)
            if name not in _warned:
                _warned.add(name)
                warnings.warn(problem, UntestedVersionWarning, stacklevel=2)
    return problems
