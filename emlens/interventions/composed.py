"""Several interventions applied together: :class:`Composed` (also written ``a + b``).

The parts act in order: at a hook point shared by two parts, the first one's edit is made
first (e.g. ``DirectionAblation(...) + SteeringVector(...)`` at the same hook ablates, then
adds). Training a composition trains every part's parameters jointly.

Geometry: a composition is the direct sum of its *sized* parts. ``flatten`` concatenates their
flattenings, ``inner`` sums their inner products (part by part, same kinds in the same order),
``norm`` is ``sqrt(Σ normᵢ²)`` (for LoRA parts, whose norm is a mean over modules, the mean over
all their modules, as one adapter's), ``scaled_to`` scales every sized part's norm by one factor,
and ``perturbed`` / ``random_like`` apply each sized part's own rule. Parts that are not sizes
(an ablation: ``fixed_in_compositions``) are kept as they are, so that "solution + ablation"
rescaled or perturbed changes the solution only; a composition of such parts alone uses them all.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any, cast

import torch
from jaxtyping import Float
from torch import Tensor, nn

from emlens.geometry import part_seed
from emlens.interventions.base import (
    INTERVENTION_TYPES,
    HookFn,
    Intervention,
    InterventionError,
    ResidualOffset,
    _check_norm,
    register_intervention,
)


@register_intervention
class Composed(Intervention):
    """The interventions ``parts`` applied together, in order (nested compositions are flattened)."""

    kind = "composed"
    parts: nn.ModuleList

    def __init__(self, parts: Sequence[Intervention], model_name: str | None = None):
        flat: list[Intervention] = []
        for part in parts:
            if not isinstance(part, Intervention):
                raise InterventionError(f"a composition holds interventions, not {type(part).__name__}")
            flat += part.members() if isinstance(part, Composed) else [part]
        if not flat:
            raise InterventionError("a composition needs at least one intervention")
        if len({id(p) for p in flat}) != len(flat):
            raise InterventionError("the same intervention appears twice in a composition (it would act twice)")
        names = {p.model_name for p in flat if p.model_name}
        super().__init__(min(p.layer for p in flat), model_name or (names.pop() if len(names) == 1 else None))
        self.parts = nn.ModuleList(flat)

    def members(self) -> list[Intervention]:
        """The parts, in order."""
        return [cast(Intervention, p) for p in self.parts]

    def __iter__(self) -> Iterator[Intervention]:
        return iter(self.members())

    def __len__(self) -> int:
        return len(self.parts)

    # --- geometry -------------------------------------------------------------------------------
    def sized_parts(self) -> list[Intervention]:
        """The parts the geometry covers: all but those ``fixed_in_compositions`` (all, when every part is)."""
        sized = [p for p in self.members() if not p.fixed_in_compositions]
        return sized or self.members()

    def _sized(self, part: Intervention) -> bool:
        return any(part is p for p in self.sized_parts())

    def norm_tensor(self) -> Float[Tensor, ""]:
        """``sqrt(Σ normᵢ²)`` over the sized parts, or the mean over all modules when every part's norm is such a mean."""
        parts = self.sized_parts()
        norms = torch.stack([p.norm_tensor().float().cpu() for p in parts])
        counts = [p.norm_modules() for p in parts]
        if all(c is not None for c in counts):
            weights = torch.tensor([float(c) for c in counts if c is not None])
            return (weights * norms).sum() / weights.sum()
        return norms.square().sum().sqrt()

    @property
    def unscaled_norm(self) -> float:
        """:meth:`norm_tensor`'s rule on each sized part's norm without its own scale: ``sqrt(Σ unscaled_normᵢ²)``,
        or the module-weighted mean when every part's norm is a mean over modules (LoRA parts)."""
        parts = self.sized_parts()
        counts = [p.norm_modules() for p in parts]
        if all(c is not None for c in counts):
            weights = [float(c) for c in counts if c is not None]
            return sum(w * p.unscaled_norm for w, p in zip(weights, parts)) / sum(weights)
        return float(sum(p.unscaled_norm**2 for p in parts) ** 0.5)

    def flatten(self) -> Float[Tensor, " n"]:
        return torch.cat([p.flatten() for p in self.sized_parts()])

    def _check_compatible(self, other: Intervention) -> Composed:
        self._check_same_kind(other)
        assert isinstance(other, Composed)
        if [p.kind for p in other.members()] != [p.kind for p in self.members()]:
            raise InterventionError(
                f"compositions of different parts: {[p.kind for p in self.members()]} vs {[p.kind for p in other.members()]}"
            )
        return other

    def inner(self, other: Intervention) -> float:
        theirs = self._check_compatible(other)
        pairs = zip(self.members(), theirs.members())
        return float(sum(mine.inner(part) for mine, part in pairs if self._sized(mine)))

    def perturbed(self, epsilon: float, generator: torch.Generator | None = None) -> Composed:
        """Each sized part under its own rule, in order, drawing from ``generator``; the others as they are."""
        return Composed([p.perturbed(epsilon, generator) if self._sized(p) else p.clone() for p in self.members()], self.model_name)

    def random_like(self, seed: int = 0) -> Composed:
        """Each sized part's random counterpart, part ``i`` seeded from ``(seed, i)`` by :func:`~emlens.geometry.part_seed`
        (``seed + i`` gave part 1 of ``random_like(k)`` the draw of part 0 of ``random_like(k + 1)``: baselines ``k`` and
        ``k + 1`` shared a direction); the others as they are."""
        parts = [p.random_like(part_seed(seed, i)) if self._sized(p) else p.clone() for i, p in enumerate(self.members())]
        return Composed(parts, self.model_name)

    def scaled_to(self, norm: float) -> Composed:
        """Every sized part's norm multiplied by ``norm / self.norm`` (parts of norm 0, and the others, stay as they are)."""
        norm = _check_norm(norm)
        current = self.norm
        if current == 0:
            raise InterventionError("cannot rescale a composition whose parts are all zero")
        factor = norm / current
        parts = [p.scaled_to(p.norm * factor) if self._sized(p) and p.norm > 0 else p.clone() for p in self.members()]
        return Composed(parts, self.model_name)

    def at_norm(self, norm: float) -> Intervention | None:
        """At norm 0 the parts rescaling leaves alone (an ablation beside a vector) still act: the sweep's first point
        is the composition with its sized parts at zero, not the bare model (None only when every part rescales)."""
        if norm == 0 and any(not self._sized(p) for p in self.members()):
            return self.scaled_to(0.0)
        return super().at_norm(norm)

    # --- how it acts ------------------------------------------------------------------------------
    def acts_per_position(self) -> bool:
        return any(p.acts_per_position() for p in self.members())

    def residual_offset(self) -> ResidualOffset | None:
        """The summed vector of the enabled parts, when every part adds one vector at the same hook (else None).

        A part switched off (``with part.disabled():``) adds nothing, as on the hooked path; all of them off: zeros."""
        offsets = [p.residual_offset() for p in self.members()]
        if any(o is None for o in offsets) or len({o.hook for o in offsets if o is not None}) != 1:
            return None
        found = [o for o in offsets if o is not None]
        on = [o.vector for o, p in zip(found, self.members()) if p.enabled]
        total = torch.stack(on).sum(0) if on else torch.zeros_like(found[0].vector)
        return ResidualOffset(found[0].hook, total)

    def hook_names(self) -> list[str]:
        return list(dict.fromkeys(name for p in self.members() for name in p.hook_names()))

    def check_model(self, model: Any, allow_other_model: bool = False) -> None:
        for part in self.members():
            part.check_model(model, allow_other_model)

    @contextmanager
    def applied(self, model: Any) -> Iterator[Any]:
        """Every part applied, in order (applying a part again inside would make it act twice, and raises)."""
        self.check_model(model)
        self.refuse_if_applied(model)
        marked = [self, *self.members()]
        with ExitStack() as stack:
            for item in marked:
                item._applied_to.add(id(model))
                stack.callback(item._applied_to.discard, id(model))
            with model.hooks(fwd_hooks=self.fwd_hooks()):
                yield model

    def refuse_if_applied(self, model: Any) -> None:
        super().refuse_if_applied(model)
        for part in self.members():
            part.refuse_if_applied(model)

    def fwd_hooks(self) -> list[tuple[str, HookFn]]:
        hooks: list[tuple[str, HookFn]] = []
        for part in self.members():
            for name, fn in part.fwd_hooks():

                def gated(act: Tensor, hook: Any, fn: HookFn = fn) -> Tensor | None:
                    return fn(act, hook) if self.enabled else None

                hooks.append((name, gated))
        return hooks

    # --- saving ---------------------------------------------------------------------------------
    def metadata(self) -> dict[str, Any]:
        return {"type": self.kind, "layer": self.layer, "parts": [p.metadata() for p in self.members()], "model_name": self.model_name}

    @classmethod
    def from_state(cls, meta: dict[str, Any], state: dict[str, Tensor]) -> Composed:
        parts = []
        for i, part_meta in enumerate(meta["parts"]):
            part_cls = INTERVENTION_TYPES.get(part_meta.get("type"))
            if part_cls is None:
                raise InterventionError(f"part {i}: unknown intervention type {part_meta.get('type')!r}")
            prefix = f"parts.{i}."
            parts.append(part_cls.from_state(part_meta, {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}))
        return cls(parts, meta.get("model_name"))

    def extra_repr(self) -> str:
        return f"{len(self.parts)} parts, norm={self.norm:.4g}" if math.isfinite(self.norm) else f"{len(self.parts)} parts"
