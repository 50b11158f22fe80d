"""One steering vector per layer, trained jointly.

:class:`MultiLayerSteering` adds ``alpha · v_L`` at the same hook point (by default
``hook_resid_post``) of every layer ``L`` in ``layers``, at every position of every batch element.
Its geometry is that of the concatenated effective vectors: ``inner`` and ``flatten`` are the
Euclidean ones on ``[alpha·v_L1, alpha·v_L2, ...]`` and ``norm`` is that vector's length, so
``norm² = inner(self, self)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor, nn

from emlens.geometry import baseline_generator, orthogonal_noise
from emlens.interventions.base import (
    HookFn,
    Intervention,
    InterventionError,
    ResidualOffset,
    _check_finite,
    _check_finite_number,
    _check_hook_layer,
    _check_norm,
    _check_width,
    _resolve_hook,
    register_intervention,
)


def _layer_list(layers: int | Sequence[int], n_layers: int | None = None) -> list[int]:
    chosen = [int(layers)] if isinstance(layers, int) else [int(x) for x in layers]
    if not chosen or len(set(chosen)) != len(chosen) or any(x < 0 for x in chosen):
        raise InterventionError(f"layers must be distinct integers >= 0 (at least one), got {layers!r}")
    if n_layers is not None and max(chosen) >= n_layers:
        raise InterventionError(f"layer {max(chosen)} is out of range: the model has layers 0-{n_layers - 1}")
    return sorted(chosen)


@register_intervention
class MultiLayerSteering(Intervention):
    """A trainable vector per layer, each added as ``alpha · v_L`` at ``hook`` of layer ``L``.

    Args:
        layers: the layers steered (kept sorted; row ``i`` of :attr:`vectors` belongs to the ``i``-th smallest).
        d_model: width of the vectors.
        hook: a ``"{layer}"`` template or shorthand (``"resid_post"`` default, ``"mlp_out"``, ``"resid_pre"``...).
        alpha: fixed scale (the paper's steering vectors use 256 with a zero start).
        init: optional ``[len(layers), d_model]`` initial ``v``, row ``i`` for ``layers[i]`` as given (the effective
            vectors are ``alpha · init``).
    """

    kind = "multi_layer_steering"

    def __init__(
        self,
        layers: int | Sequence[int],
        d_model: int,
        hook: str = "resid_post",
        alpha: float = 256.0,
        init: Float[Tensor, "n_layers d_model"] | None = None,
        model_name: str | None = None,
    ):
        chosen = _layer_list(layers)
        given = [int(layers)] if isinstance(layers, int) else [int(x) for x in layers]
        super().__init__(chosen[0], model_name)
        self.layers = chosen
        self.d_model = int(d_model)
        template = {"resid_post", "resid_pre", "resid_mid", "mlp_out", "attn_out"}
        if hook not in template and "{layer}" not in hook:
            raise InterventionError(f"hook must be a shorthand ({', '.join(sorted(template))}) or a '{{layer}}' template, got {hook!r}")
        self.hook_template = hook
        self.hooks = [_resolve_hook(hook, layer) for layer in chosen]
        for name, layer in zip(self.hooks, chosen):
            _check_hook_layer(name, layer, "hook")
        self.alpha = _check_finite_number(alpha, "alpha")
        if self.alpha == 0:
            raise InterventionError("alpha must not be 0 (the vectors would have no effect and no direction)")
        if init is not None:
            init = torch.as_tensor(init, dtype=torch.float32).detach().clone()
            if init.shape != (len(chosen), self.d_model):
                raise InterventionError(f"init has shape {tuple(init.shape)}, expected ({len(chosen)}, {self.d_model})")
            _check_finite(init, "multi-layer steering init")
            init = init[[given.index(layer) for layer in chosen]]  # row i of init is given[i]'s: sorted with the layers
        self.vectors = nn.Parameter(init if init is not None else torch.zeros(len(chosen), self.d_model))

    @classmethod
    def for_model(cls, model: Any, layers: int | Sequence[int] | Literal["all"] | None = None, **kwargs: Any) -> MultiLayerSteering:
        """Zero vectors sized for ``model`` at ``layers`` (default: the middle layer; ``"all"``: every layer)."""
        n_layers = model.cfg.n_layers
        if layers is None:
            layers = [n_layers // 2]
        elif isinstance(layers, str):
            if layers != "all":
                raise InterventionError(f"layers must be a layer, a list of layers or 'all', got {layers!r}")
            layers = list(range(n_layers))
        kwargs.setdefault("model_name", getattr(model.cfg, "model_name", None))
        return cls(_layer_list(layers, n_layers), model.cfg.d_model, **kwargs)

    @classmethod
    def from_vectors(cls, vectors: dict[int, Tensor], alpha: float = 1.0, **kwargs: Any) -> MultiLayerSteering:
        """Wrap fixed effective vectors ``{layer: vector}`` (``alpha · v_L == vector``)."""
        layers = sorted(vectors)
        if not layers:
            raise InterventionError("no vectors given")
        stacked = torch.stack([torch.as_tensor(vectors[x]).detach().float().cpu() for x in layers])
        return cls(layers, stacked.shape[-1], alpha=alpha, init=stacked / float(alpha), **kwargs)

    @classmethod
    def from_steering_vectors(cls, vectors: Sequence[Any]) -> MultiLayerSteering:
        """Combine :class:`~emlens.interventions.SteeringVector` s (same shorthand hook, width) into one; vectors at
        one layer are summed, as they act together (adding both there is adding their sum)."""
        if not vectors:
            raise InterventionError("no steering vectors given")
        first = vectors[0]
        template = first.hook.replace(f"blocks.{first.layer}.", "blocks.{layer}.", 1)
        for v in vectors:
            if v.hook.replace(f"blocks.{v.layer}.", "blocks.{layer}.", 1) != template or v.positions != "all":
                raise InterventionError("steering vectors must share one hook (per layer) and steer every position")
        summed: dict[int, Tensor] = {}
        for v in vectors:
            vec = v.effective.detach().float().cpu()
            summed[v.layer] = summed[v.layer] + vec if v.layer in summed else vec
        return cls.from_vectors(summed, 1.0, hook=template, model_name=first.model_name)

    @property
    def effective(self) -> Float[Tensor, "n_layers d_model"]:
        """The vectors actually added, one row per layer: ``alpha · v``."""
        return self.alpha * self.vectors

    def vector_at(self, layer: int) -> Float[Tensor, " d_model"]:
        """The effective vector added at ``layer`` (detached)."""
        if layer not in self.layers:
            raise InterventionError(f"layer {layer} is not steered (layers {self.layers})")
        return self.effective.detach()[self.layers.index(layer)]

    # --- geometry -------------------------------------------------------------------------------
    def norm_tensor(self) -> Float[Tensor, ""]:
        """Length of the concatenated effective vectors."""
        return self.effective.detach().norm()

    def layer_norms(self) -> dict[int, float]:
        """``‖alpha · v_L‖`` per layer."""
        return dict(zip(self.layers, self.effective.detach().norm(dim=-1).tolist()))

    flat_geometry = True

    @property
    def fixed_scale(self) -> float:
        return self.alpha

    def flatten(self) -> Float[Tensor, " n"]:
        return self.effective.detach().float().cpu().flatten()

    def inner(self, other: Intervention) -> float:
        self._check_same_kind(other)
        assert isinstance(other, MultiLayerSteering)
        if other.layers != self.layers or other.d_model != self.d_model:
            raise InterventionError(f"multi-layer steering at different layers or widths: {self.layers} vs {other.layers}")
        return float(self.flatten().double() @ other.flatten().double())

    def perturbed(self, epsilon: float, generator: torch.Generator | None = None) -> MultiLayerSteering:
        """Norm-preserving orthogonal noise on each layer's vector independently (every layer's norm is kept,
        hence the total; the whole is ``sqrt(1-ε²)·x + ε·y`` with ``y ⟂ x``, ``‖y‖ = ‖x‖``). Layers draw in order."""
        eff = self.effective.detach()
        return self.with_effective(torch.stack([orthogonal_noise(row, epsilon, generator) for row in eff]))

    def random_like(self, seed: int = 0) -> MultiLayerSteering:
        """Gaussian vectors, each layer's rescaled to this one's norm there."""
        gen = baseline_generator(seed)
        rand = torch.randn(len(self.layers), self.d_model, generator=gen).to(self.vectors.device)
        norms = self.effective.detach().norm(dim=-1, keepdim=True)
        return self.with_effective(rand / rand.norm(dim=-1, keepdim=True) * norms)

    def scaled_to(self, norm: float) -> MultiLayerSteering:
        norm = _check_norm(norm)
        current = self.norm
        if current == 0:
            raise InterventionError("cannot rescale zero steering vectors")
        return self.with_effective(self.effective.detach() * (norm / current))

    def with_effective(self, vectors: Float[Tensor, "n_layers d_model"]) -> MultiLayerSteering:
        """A copy with the same settings and other effective vectors."""
        if vectors.shape != self.vectors.shape:
            raise InterventionError(f"vectors have shape {tuple(vectors.shape)}, expected {tuple(self.vectors.shape)}")
        return MultiLayerSteering(
            self.layers, self.d_model, self.hook_template, self.alpha, vectors.detach().float().cpu() / self.alpha, self.model_name
        ).to(self.vectors.device)

    # --- how it acts ------------------------------------------------------------------------------
    def residual_offset(self) -> ResidualOffset | None:
        if len(self.layers) == 1:  # one vector at one hook: the runner's offset path applies
            return ResidualOffset(self.hooks[0], self.effective[0])
        return None

    def hook_names(self) -> list[str]:
        return list(self.hooks)

    def check_model(self, model: Any, allow_other_model: bool = False) -> None:
        super().check_model(model, allow_other_model)
        cfg = getattr(model, "cfg", None)
        n_layers = getattr(cfg, "n_layers", None)
        if n_layers is not None and self.layers[-1] >= n_layers:
            raise InterventionError(f"{self.kind} steers layer {self.layers[-1]}, but the model has layers 0-{n_layers - 1}")
        width = getattr(cfg, "d_model", None)
        if width is not None and "resid" in self.hook_template and width != self.d_model:
            raise InterventionError(f"steering vectors have width {self.d_model} but the model's d_model is {width}")

    def fwd_hooks(self) -> list[tuple[str, HookFn]]:
        hooks: list[tuple[str, HookFn]] = []
        for row, name in enumerate(self.hooks):

            def add_vector(act: Tensor, hook: Any, row: int = row, name: str = name) -> Tensor | None:
                if not self.enabled:
                    return None
                _check_width(act, self.d_model, "steering vector", name)
                return act + self.effective[row].to(dtype=act.dtype, device=act.device)

            hooks.append((name, add_vector))
        return hooks

    # --- saving ---------------------------------------------------------------------------------
    def metadata(self) -> dict[str, Any]:
        return {
            "type": self.kind,
            "layer": self.layer,
            "layers": self.layers,
            "d_model": self.d_model,
            "hook": self.hook_template,
            "hooks": self.hooks,
            "alpha": self.alpha,
            "model_name": self.model_name,
        }

    @classmethod
    def from_state(cls, meta: dict[str, Any], state: dict[str, Tensor]) -> MultiLayerSteering:
        steering = cls(
            meta["layers"], meta["d_model"], meta["hook"], meta["alpha"], init=state["vectors"], model_name=meta.get("model_name")
        )
        if int(meta["layer"]) != steering.layer:
            raise InterventionError(f"layer {meta['layer']} contradicts layers {steering.layers}")
        return steering

    def extra_repr(self) -> str:
        return f"layers={self.layers}, hook={self.hook_template!r}, d_model={self.d_model}, alpha={self.alpha}, norm={self.norm:.4g}"
