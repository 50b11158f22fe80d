"""Directional ablation: a direction projected out of the residual stream, and out of an adapter's ``B``.

:class:`DirectionAblation` replaces the activation ``x`` at each of its hook points by
``x − s·(x·u) u`` (``u`` unit, ``s`` the strength: 1 removes the component along ``u``, 2
reflects it, values in between shrink it). :meth:`DirectionAblation.everywhere` ablates the
residual stream between blocks: at ``blocks.0.hook_resid_pre`` and at every ``hook_resid_post``,
so no block's input and not the unembedding holds ``u``. Inside a block, what attention writes
along ``u`` still reaches that block's MLP (``hook_resid_mid`` is not ablated).

Geometry: an ablation's size is its strength and its direction is a line, not a sign (``u`` and
``−u`` ablate alike), so it is that of the projection ``s·u uᵀ``: norm ``s``, inner product
``s₁ s₂ (u₁·u₂)²``.

:func:`project_out_of_adapter` removes a direction from the output side (``B``) of a
:class:`~emlens.interventions.RankOneAdapter` or of the residual-writing modules (``o``, ``down``)
of a :class:`~emlens.interventions.LoRAAdapter`, optionally giving each module back its norm.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from emlens.geometry import baseline_generator, orthogonal_noise
from emlens.interventions.base import (
    HookFn,
    Intervention,
    InterventionError,
    RankOneAdapter,
    _check_finite,
    _check_finite_number,
    _check_norm,
    _check_width,
    _resolve_hook,
    register_intervention,
)
from emlens.interventions.lora import RESIDUAL_WRITERS, LoRAAdapter, site_key

_LAYER = re.compile(r"^blocks\.(\d+)\.")


def _unit(direction: Tensor, what: str = "direction") -> Float[Tensor, " d"]:
    direction = torch.as_tensor(direction).detach().float()
    if direction.ndim != 1:
        raise InterventionError(f"{what} must be a vector, got shape {tuple(direction.shape)}")
    _check_finite(direction, what)
    norm = direction.norm()
    if norm == 0:
        raise InterventionError(f"{what} is zero: it has no direction")
    return direction / norm


@register_intervention
class DirectionAblation(Intervention):
    """Project a unit direction ``u`` out of the activation at each of ``hooks``: ``x ← x − s·(x·u) u``.

    Args:
        direction: any non-zero vector of the activations' width (normalised here).
        hooks: full hook names (``blocks.L.hook_resid_post``...); see :meth:`at_layer` and :meth:`everywhere`.
        strength: ``s`` (1: ablate; its :attr:`norm`).

    Its geometry is that of the projection it applies, ``s·u uᵀ`` (blind to the sign of ``u``, as the edit is).
    :meth:`perturbed` moves ``u`` itself by the norm-preserving rule, so a perturbed ablation has cosine
    ``1 − ε²`` with the original (``(u·u')²``), where a vector perturbed by ``ε`` has ``√(1 − ε²)``: the stability
    curves of the two kinds share the rule, not the cosine at each ε.
    """

    kind = "direction_ablation"
    direction: Tensor  # the unit vector u (a buffer: saved, moved with the module, never trained)
    fixed_in_compositions = True  # "solution + ablation": rescaling or perturbing the solution leaves the ablation as it is

    def __init__(self, direction: Float[Tensor, " d_model"], hooks: Sequence[str], strength: float = 1.0, model_name: str | None = None):
        hooks = list(dict.fromkeys(hooks))
        layers = []
        for name in hooks:
            found = _LAYER.match(name)
            if found is None:
                raise InterventionError(f"hook {name!r} is not a per-layer hook point (blocks.L....)")
            layers.append(int(found.group(1)))
        if not hooks:
            raise InterventionError("a direction ablation needs at least one hook point")
        super().__init__(min(layers), model_name)
        self.hooks = hooks
        self.strength = _check_norm(_check_finite_number(strength, "strength"))
        unit = _unit(direction)
        self.d_model = int(unit.shape[0])
        self.register_buffer("direction", unit)

    @classmethod
    def at_layer(
        cls,
        direction: Float[Tensor, " d_model"],
        layer: int,
        hook: str = "resid_post",
        strength: float = 1.0,
        model_name: str | None = None,
    ) -> DirectionAblation:
        """Ablate at one hook of one layer (``hook``: shorthand, template or full name)."""
        return cls(direction, [_resolve_hook(hook, layer)], strength, model_name)

    @classmethod
    def at_layers(
        cls,
        direction: Float[Tensor, " d_model"],
        layers: Sequence[int],
        hook: str = "resid_post",
        strength: float = 1.0,
        model_name: str | None = None,
    ) -> DirectionAblation:
        """Ablate at the same hook (shorthand or ``{layer}`` template) of each of ``layers``."""
        return cls(direction, [_resolve_hook(hook, int(x)) for x in layers], strength, model_name)

    @classmethod
    def everywhere(cls, model: Any, direction: Float[Tensor, " d_model"], strength: float = 1.0) -> DirectionAblation:
        """Ablate from the residual stream between blocks: the embeddings (``blocks.0.hook_resid_pre``) and every
        block's output (``blocks.L.hook_resid_post``), so no block's input holds ``u`` and the unembedding never sees
        it. Within a block, attention's write along ``u`` still reaches the MLP (``hook_resid_mid`` is not ablated)."""
        n_layers = model.cfg.n_layers
        hooks = ["blocks.0.hook_resid_pre"] + [f"blocks.{x}.hook_resid_post" for x in range(n_layers)]
        return cls(direction, hooks, strength, getattr(model.cfg, "model_name", None))

    @property
    def effective(self) -> Float[Tensor, " d_model"]:
        """``s · u``."""
        return self.strength * self.direction

    # --- geometry -------------------------------------------------------------------------------
    def norm_tensor(self) -> Float[Tensor, ""]:
        """The strength ``s`` (``‖s·u uᵀ‖_F``, ``u`` a unit vector)."""
        return self.effective.detach().norm()

    @classmethod
    def gram(cls, items: Sequence[Intervention]) -> Float[Tensor, "n n"]:
        """``sᵢ sⱼ (uᵢ·uⱼ)²`` for every pair: :meth:`inner` from the directions, no ``d_model²`` projection built."""
        ablations = [i for i in items if isinstance(i, DirectionAblation)]
        if len(ablations) != len(items):
            raise InterventionError("a Gram matrix of direction ablations needs direction ablations only")
        if len({a.d_model for a in ablations}) > 1:
            raise InterventionError(f"ablation directions have different widths: {sorted({a.d_model for a in ablations})}")
        u = torch.stack([a.direction.detach().double().cpu() for a in ablations])
        s = torch.tensor([a.strength for a in ablations], dtype=torch.float64)
        return (u @ u.T).square() * torch.outer(s, s)

    def flatten(self) -> Float[Tensor, " n"]:
        """The projection ``s·u uᵀ``, flattened (``d_model²`` floats): ``u`` and ``−u`` give the same."""
        u = self.direction.detach().float().cpu()
        return (self.strength * torch.outer(u, u)).flatten()

    def inner(self, other: Intervention) -> float:
        """``s₁ s₂ (u₁·u₂)²``: the Frobenius inner product of the two projections, blind to the sign of ``u``."""
        self._check_same_kind(other)
        assert isinstance(other, DirectionAblation)
        if other.d_model != self.d_model:
            raise InterventionError(f"ablation directions have different widths: {self.d_model} and {other.d_model}")
        dot = float(self.direction.detach().double().cpu() @ other.direction.detach().double().cpu())
        return self.strength * other.strength * dot * dot

    def perturbed(self, epsilon: float, generator: torch.Generator | None = None) -> DirectionAblation:
        """The direction under norm-preserving orthogonal noise (still a unit vector), same strength."""
        return self.with_direction(orthogonal_noise(self.direction, epsilon, generator), self.strength)

    def random_like(self, seed: int = 0) -> DirectionAblation:
        gen = baseline_generator(seed)
        return self.with_direction(torch.randn(self.d_model, generator=gen), self.strength)

    def scaled_to(self, norm: float) -> DirectionAblation:
        """A copy of strength ``norm`` (0: no effect, 1: full ablation)."""
        return self.with_direction(self.direction, _check_norm(norm))

    def with_direction(self, direction: Float[Tensor, " d_model"], strength: float | None = None) -> DirectionAblation:
        """A copy at the same hooks with another direction (and strength)."""
        strength = self.strength if strength is None else strength
        return DirectionAblation(direction, self.hooks, strength, self.model_name).to(self.direction.device)

    # --- how it acts ------------------------------------------------------------------------------
    def hook_names(self) -> list[str]:
        return list(self.hooks)

    def check_model(self, model: Any, allow_other_model: bool = False) -> None:
        super().check_model(model, allow_other_model)
        width = getattr(getattr(model, "cfg", None), "d_model", None)
        if width is not None and all("resid" in h for h in self.hooks) and width != self.d_model:
            raise InterventionError(f"ablation direction has width {self.d_model} but the model's d_model is {width}")

    def fwd_hooks(self) -> list[tuple[str, HookFn]]:
        def ablate(act: Tensor, hook: Any) -> Tensor | None:
            if not self.enabled or self.strength == 0:
                return None
            _check_width(act, self.d_model, "ablation direction", getattr(hook, "name", None) or "its hook")
            u = self.direction.to(dtype=act.dtype, device=act.device)
            return act - self.strength * (act @ u).unsqueeze(-1) * u

        return [(name, ablate) for name in self.hooks]

    # --- saving ---------------------------------------------------------------------------------
    def metadata(self) -> dict[str, Any]:
        return {
            "type": self.kind,
            "layer": self.layer,
            "d_model": self.d_model,
            "hooks": self.hooks,
            "strength": self.strength,
            "model_name": self.model_name,
        }

    @classmethod
    def from_state(cls, meta: dict[str, Any], state: dict[str, Tensor]) -> DirectionAblation:
        ablation = cls(state["direction"], meta["hooks"], meta["strength"], meta.get("model_name"))
        if ablation.d_model != int(meta["d_model"]) or ablation.layer != int(meta["layer"]):
            raise InterventionError("the direction's width or the layer contradicts the metadata")
        return ablation

    def extra_repr(self) -> str:
        where = self.hooks[0] if len(self.hooks) == 1 else f"{len(self.hooks)} hooks from layer {self.layer}"
        return f"{where}, d_model={self.d_model}, strength={self.strength}"


def _project_columns(b: Tensor, unit: Tensor) -> Tensor:
    """``(I − u uᵀ) B`` for ``B`` of shape ``[d_out, ...]`` (columns projected)."""
    u = unit.to(device=b.device, dtype=b.dtype)
    flat = b.reshape(b.shape[0], -1)
    return (flat - torch.outer(u, u @ flat)).reshape(b.shape)


def project_out_of_adapter(
    adapter: Intervention, direction: Float[Tensor, " d"], renormalize: bool = False, modules: Sequence[str] | None = None
) -> Intervention:
    """A copy of ``adapter`` whose output side ``B`` has no component along ``direction``: ``B ← (I − u uᵀ) B``.

    Works on a :class:`RankOneAdapter` (``b``) and on a :class:`LoRAAdapter` (the modules in
    ``modules``, by default those writing to the residual stream: ``o`` and ``down``; their output
    width must equal the direction's). The update ``ΔW`` becomes ``(I − u uᵀ) ΔW``: the adapter can
    no longer write along ``u``. With ``renormalize=True`` each module's update is rescaled to its
    norm before the projection (a module left with no update raises).

    On Gemma-2/3 the down/o outputs pass through a post-norm before the residual, so "the residual
    direction" is then only approximately the module output's direction.
    """
    unit = _unit(direction)
    if isinstance(adapter, RankOneAdapter):
        if unit.shape[0] != adapter.d_model:
            raise InterventionError(f"direction has width {unit.shape[0]} but the adapter's b has {adapter.d_model}")
        b = _project_columns(adapter.b.detach(), unit)
        if renormalize:
            b = _renormalised(b, adapter.b.detach(), "the adapter")
        return adapter.with_factors(adapter.a.detach(), b)
    if isinstance(adapter, LoRAAdapter):
        chosen = [p for p in adapter.projections if p in RESIDUAL_WRITERS] if modules is None else list(modules)
        if not chosen or any(p not in adapter.projections for p in chosen):
            raise InterventionError(f"no such adapted module to project: {chosen or 'none of o, down'} (adapter has {adapter.projections})")
        new_b = {}
        for layer, proj in adapter.sites():
            key = site_key(layer, proj)
            b = adapter.B[key].detach()
            if proj in chosen:
                if b.shape[0] != unit.shape[0]:
                    raise InterventionError(f"direction has width {unit.shape[0]} but module {key} writes width {b.shape[0]}")
                projected = _project_columns(b, unit)
                if renormalize:
                    # ‖B A‖ is not ‖B‖·‖A‖: rescale by the ratio of the updates' norms
                    a = adapter.A[key].detach()
                    before, after = float((b @ a).norm()), float((projected @ a).norm())
                    if after == 0 and before > 0:
                        raise InterventionError(f"module {key}'s update lies along the direction: nothing is left to renormalise")
                    projected = projected * (before / after) if after > 0 else projected
                b = projected
            new_b[key] = b
        return adapter.with_factors({k: v.detach() for k, v in adapter.A.items()}, new_b)
    raise InterventionError(f"cannot project a direction out of a {adapter.kind} (only adapters have a B)")


def _renormalised(new: Tensor, old: Tensor, what: str) -> Tensor:
    before, after = float(old.norm()), float(new.norm())
    if after == 0 and before > 0:
        raise InterventionError(f"{what}'s update lies along the direction: nothing is left to renormalise")
    return new * (before / after) if after > 0 else new
