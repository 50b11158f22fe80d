"""Trainable interventions applied through TransformerLens hook points.

* :class:`SteeringVector` adds ``alpha * v`` to one hook point (by default the residual
  stream after layer L's MLP) at every position of every batch element.
* :class:`RankOneAdapter` adds a rank-1 update ``scale * b aᵀ`` to layer L's MLP
  down-projection, applied by hooks (the model's weights are never touched).

Both are ``torch.nn.Module``s holding only their own parameters; the model stays frozen.
"""

from __future__ import annotations

import difflib
from abc import ABC, abstractmethod
import json
import math
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Sequence

import torch
from jaxtyping import Float
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

HookFn = Callable[[Tensor, Any], Tensor | None]

HOOK_SHORTHANDS = {
    "resid_post": "blocks.{layer}.hook_resid_post",
    "resid_pre": "blocks.{layer}.hook_resid_pre",
    "resid_mid": "blocks.{layer}.hook_resid_mid",
    "mlp_out": "blocks.{layer}.hook_mlp_out",
    "attn_out": "blocks.{layer}.hook_attn_out",
}


class InterventionError(ValueError):
    """An intervention does not fit the model it is applied to."""


def check_hook_name(model: Any, name: str) -> None:
    """Raise a clear error when ``name`` is not a hook point of ``model``, suggesting close names."""
    hook_dict = getattr(model, "hook_dict", None)
    if hook_dict is None:
        raise InterventionError(f"{type(model).__name__} has no hook_dict: not a TransformerLens-style model")
    if name not in hook_dict:
        close = difflib.get_close_matches(name, list(hook_dict), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise InterventionError(f"model has no hook point {name!r}{hint}")


def _check_width(tensor: Tensor, expected: int, what: str, hook_name: str) -> None:
    if tensor.shape[-1] != expected:
        raise InterventionError(
            f"{what} has width {expected} but the activation at {hook_name} has width {tensor.shape[-1]}"
        )


class Intervention(nn.Module, ABC):
    """Base class: something that edits a model's forward pass through named hooks."""

    kind: str = "intervention"

    def __init__(self, layer: int, model_name: str | None = None):
        super().__init__()
        self.layer = int(layer)
        self.model_name = model_name
        self.enabled = True

    # --- what each kind defines ---------------------------------------------------
    @abstractmethod
    def hook_names(self) -> list[str]:
        """The hook points this intervention reads or writes."""

    @abstractmethod
    def fwd_hooks(self) -> list[tuple[str, HookFn]]:
        """``(hook name, hook function)`` pairs for ``model.hooks``."""

    @abstractmethod
    def metadata(self) -> dict[str, Any]:
        """JSON-serialisable settings (type, layer, hooks, dims, model name)."""

    @property
    @abstractmethod
    def norm(self) -> float:
        """Size of the intervention (vector norm, or Frobenius norm of the weight update)."""

    @abstractmethod
    def scaled_to(self, norm: float) -> "Intervention":
        """A copy with the same direction and the given norm."""

    def check_model(self, model: Any) -> None:
        """Raise :class:`InterventionError` if this intervention cannot be applied to ``model``."""
        for name in self.hook_names():
            check_hook_name(model, name)

    # --- shared behaviour ---------------------------------------------------------
    @contextmanager
    def applied(self, model: Any) -> Iterator[Any]:
        """Context manager: the model runs with this intervention while inside it."""
        self.check_model(model)
        with model.hooks(fwd_hooks=self.fwd_hooks()):
            yield model

    @contextmanager
    def disabled(self) -> Iterator["Intervention"]:
        """Context manager: hooks stay registered but leave activations untouched."""
        previous, self.enabled = self.enabled, False
        try:
            yield self
        finally:
            self.enabled = previous

    def clone(self) -> "Intervention":
        other = type(self).from_state(self.metadata(), {k: v.detach().clone() for k, v in self.state_dict().items()})
        return other

    def save(self, path: str | Path) -> Path:
        """Save to ``path`` (``.safetensors``) with JSON metadata (type, model, layer, hooks, dims)."""
        path = Path(path)
        if path.suffix != ".safetensors":
            path = path.with_suffix(".safetensors")
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(tensors, str(path), metadata={"emlens": json.dumps(self.metadata())})
        return path

    @staticmethod
    def load(path: str | Path, device: str | torch.device = "cpu") -> "Intervention":
        """Load any saved intervention, returning the right class."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no intervention file at {path}")
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            header = (fh.metadata() or {}).get("emlens")
        if header is None:
            raise InterventionError(f"{path} is not an emlens intervention (no 'emlens' metadata)")
        meta = json.loads(header)
        cls = {c.kind: c for c in (SteeringVector, RankOneAdapter)}.get(meta.get("type"))
        if cls is None:
            raise InterventionError(f"{path}: unknown intervention type {meta.get('type')!r}")
        return cls.from_state(meta, load_file(str(path), device=str(device)))

    @classmethod
    @abstractmethod
    def from_state(cls, meta: dict[str, Any], state: dict[str, Tensor]) -> "Intervention":
        """Rebuild from :meth:`metadata` and a state dict."""


def _resolve_hook(hook: str, layer: int) -> str:
    template = HOOK_SHORTHANDS.get(hook, hook)
    return template.format(layer=layer)


class SteeringVector(Intervention):
    """One trainable vector added as ``alpha * v`` at a hook point, at every position of every batch element.

    Args:
        layer: layer index L.
        d_model: width of the vector (must equal the activation width at the hook).
        hook: hook name, ``"{layer}"`` template or shorthand (``"resid_post"`` default, ``"mlp_out"``...).
        positions: ``"all"`` or a list of token positions to steer.
        alpha: fixed scale; the paper uses 256 with ``v`` initialised at zero.
        init: optional initial ``v`` (effective vector is ``alpha * init``).
    """

    kind = "steering_vector"

    def __init__(
        self,
        layer: int,
        d_model: int,
        hook: str = "resid_post",
        positions: Literal["all"] | Sequence[int] = "all",
        alpha: float = 256.0,
        init: Float[Tensor, " d_model"] | None = None,
        model_name: str | None = None,
    ):
        super().__init__(layer, model_name)
        self.d_model = int(d_model)
        self.hook = _resolve_hook(hook, self.layer)
        if positions != "all":
            positions = [int(p) for p in positions]
        self.positions = positions
        self.alpha = float(alpha)
        if init is not None:
            init = torch.as_tensor(init, dtype=torch.float32).detach().clone()
            if init.shape != (self.d_model,):
                raise InterventionError(f"init has shape {tuple(init.shape)}, expected ({self.d_model},)")
        self.vector = nn.Parameter(init if init is not None else torch.zeros(self.d_model))

    @classmethod
    def for_model(cls, model: Any, layer: int | None = None, **kwargs: Any) -> "SteeringVector":
        """A zero vector sized for ``model`` at ``layer`` (default: the middle layer)."""
        layer = model.cfg.n_layers // 2 if layer is None else layer
        return cls(layer, model.cfg.d_model, model_name=getattr(model.cfg, "model_name", None), **kwargs)

    @classmethod
    def from_vector(cls, vector: Float[Tensor, " d_model"], layer: int, **kwargs: Any) -> "SteeringVector":
        """Wrap a fixed effective vector (``alpha * v == vector``)."""
        alpha = float(kwargs.pop("alpha", 1.0))
        return cls(layer, vector.shape[-1], alpha=alpha, init=torch.as_tensor(vector).float() / alpha, **kwargs)

    @property
    def effective(self) -> Float[Tensor, " d_model"]:
        """The vector actually added: ``alpha * v``."""
        return self.alpha * self.vector

    @property
    def norm(self) -> float:
        return float(self.effective.detach().norm())

    @property
    def direction(self) -> Float[Tensor, " d_model"]:
        """Unit vector along the steering direction (zeros for a zero vector)."""
        eff = self.effective.detach()
        n = eff.norm()
        return eff / n if n > 0 else torch.zeros_like(eff)

    def scaled_to(self, norm: float) -> "SteeringVector":
        """A copy pointing the same way with effective norm ``norm``."""
        if self.norm == 0:
            raise InterventionError("cannot rescale a zero steering vector")
        return self.with_effective(self.direction * float(norm))

    def with_effective(self, vector: Float[Tensor, " d_model"]) -> "SteeringVector":
        """A copy with the same settings and another effective vector."""
        if vector.shape != (self.d_model,):
            raise InterventionError(f"vector has shape {tuple(vector.shape)}, expected ({self.d_model},)")
        return SteeringVector(
            self.layer, self.d_model, self.hook, self.positions, self.alpha,
            init=vector.detach().float() / self.alpha, model_name=self.model_name,
        ).to(self.vector.device)

    def hook_names(self) -> list[str]:
        return [self.hook]

    def check_model(self, model: Any) -> None:
        super().check_model(model)
        width = getattr(getattr(model, "cfg", None), "d_model", None)
        if width is not None and "resid" in self.hook and width != self.d_model:
            raise InterventionError(f"steering vector has width {self.d_model} but the model's d_model is {width}")

    def fwd_hooks(self) -> list[tuple[str, HookFn]]:
        def add_vector(act: Tensor, hook: Any) -> Tensor | None:
            if not self.enabled:
                return None
            _check_width(act, self.d_model, "steering vector", self.hook)
            delta = self.effective.to(dtype=act.dtype, device=act.device)
            if self.positions == "all":
                return act + delta  # broadcasts over batch and positions
            pos = torch.tensor([p for p in self.positions if -act.shape[1] <= p < act.shape[1]], dtype=torch.long)
            mask = torch.zeros(act.shape[1], 1, dtype=act.dtype, device=act.device)
            mask[pos.to(act.device)] = 1
            return act + mask * delta

        return [(self.hook, add_vector)]

    def metadata(self) -> dict[str, Any]:
        return {
            "type": self.kind, "layer": self.layer, "d_model": self.d_model, "hook": self.hook,
            "positions": self.positions, "alpha": self.alpha, "model_name": self.model_name,
        }

    @classmethod
    def from_state(cls, meta: dict[str, Any], state: dict[str, Tensor]) -> "SteeringVector":
        return cls(
            meta["layer"], meta["d_model"], meta["hook"], meta["positions"], meta["alpha"],
            init=state["vector"], model_name=meta.get("model_name"),
        )

    def extra_repr(self) -> str:
        return f"layer={self.layer}, hook={self.hook!r}, d_model={self.d_model}, alpha={self.alpha}, norm={self.norm:.4g}"


class RankOneAdapter(Intervention):
    """A rank-1 LoRA-style update ``ΔW = scale · b aᵀ`` on layer L's MLP down-projection.

    Applied by hooks: the down-projection's input ``h`` is read at ``in_hook`` and
    ``scale · (h·a) b`` is added to its output at ``out_hook``. ``scale`` is the rsLoRA
    factor ``alpha / sqrt(rank)`` = ``alpha`` for rank 1 (paper: 256). ``a`` starts random
    and ``b`` at zero, so a fresh adapter changes nothing.
    """

    kind = "rank_one_adapter"
    IN_HOOKS = ("blocks.{layer}.mlp.out.hook_in", "blocks.{layer}.mlp.hook_post")
    OUT_HOOKS = ("blocks.{layer}.mlp.out.hook_out", "blocks.{layer}.hook_mlp_out")

    def __init__(
        self,
        layer: int,
        d_model: int,
        d_mlp: int,
        alpha: float = 256.0,
        in_hook: str | None = None,
        out_hook: str | None = None,
        seed: int | None = 0,
        model_name: str | None = None,
    ):
        super().__init__(layer, model_name)
        self.d_model, self.d_mlp = int(d_model), int(d_mlp)
        self.alpha = float(alpha)
        self.in_hook = (in_hook or self.IN_HOOKS[0]).format(layer=self.layer)
        self.out_hook = (out_hook or self.OUT_HOOKS[0]).format(layer=self.layer)
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        bound = 1.0 / math.sqrt(self.d_mlp)  # LoRA's default kaiming-uniform bound for A
        self.a = nn.Parameter((torch.rand(self.d_mlp, generator=gen) * 2 - 1) * bound)
        self.b = nn.Parameter(torch.zeros(self.d_model))

    @classmethod
    def for_model(cls, model: Any, layer: int | None = None, **kwargs: Any) -> "RankOneAdapter":
        """An adapter sized for ``model`` at ``layer`` (default: the middle layer), picking its hook names."""
        layer = model.cfg.n_layers // 2 if layer is None else layer
        hooks = getattr(model, "hook_dict", {})
        in_hook = next((h.format(layer=layer) for h in cls.IN_HOOKS if h.format(layer=layer) in hooks), None)
        out_hook = next((h.format(layer=layer) for h in cls.OUT_HOOKS if h.format(layer=layer) in hooks), None)
        kwargs.setdefault("in_hook", in_hook)
        kwargs.setdefault("out_hook", out_hook)
        return cls(layer, model.cfg.d_model, model.cfg.d_mlp, model_name=getattr(model.cfg, "model_name", None), **kwargs)

    @property
    def scale(self) -> float:
        return self.alpha  # rsLoRA: alpha / sqrt(rank), rank 1

    @property
    def norm(self) -> float:
        """Frobenius norm of the effective weight update ``scale · b aᵀ``."""
        return float(self.scale * self.a.detach().norm() * self.b.detach().norm())

    def delta_weight(self) -> Float[Tensor, "d_model d_mlp"]:
        """The dense update to the down-projection weight (``out = W h``)."""
        return self.scale * torch.outer(self.b.detach(), self.a.detach())

    @property
    def direction(self) -> Float[Tensor, "d_model d_mlp"]:
        n = self.norm
        dw = self.delta_weight()
        return dw / n if n > 0 else dw

    def scaled_to(self, norm: float) -> "RankOneAdapter":
        """A copy with the same direction and update norm ``norm`` (``b`` rescaled)."""
        if self.norm == 0:
            raise InterventionError("cannot rescale an adapter whose update is zero")
        return self.with_factors(self.a.detach(), self.b.detach() * (float(norm) / self.norm))

    def with_factors(self, a: Float[Tensor, " d_mlp"], b: Float[Tensor, " d_model"]) -> "RankOneAdapter":
        """A copy with the same settings and other factors."""
        if a.shape != (self.d_mlp,) or b.shape != (self.d_model,):
            raise InterventionError(f"factors must have shapes ({self.d_mlp},) and ({self.d_model},)")
        other = RankOneAdapter(self.layer, self.d_model, self.d_mlp, self.alpha, self.in_hook, self.out_hook, None, self.model_name)
        with torch.no_grad():
            other.a.copy_(a)
            other.b.copy_(b)
        return other.to(self.a.device)

    def hook_names(self) -> list[str]:
        return [self.in_hook, self.out_hook]

    def check_model(self, model: Any) -> None:
        super().check_model(model)
        cfg = getattr(model, "cfg", None)
        if cfg is not None and (cfg.d_model != self.d_model or cfg.d_mlp != self.d_mlp):
            raise InterventionError(
                f"adapter has (d_model, d_mlp) = ({self.d_model}, {self.d_mlp}) "
                f"but the model has ({cfg.d_model}, {cfg.d_mlp})"
            )

    def fwd_hooks(self) -> list[tuple[str, HookFn]]:
        captured: dict[str, Tensor] = {}

        def read_input(act: Tensor, hook: Any) -> None:
            if self.enabled:
                _check_width(act, self.d_mlp, "adapter factor a", self.in_hook)
                captured["h"] = act
            return None

        def add_update(act: Tensor, hook: Any) -> Tensor | None:
            if not self.enabled:
                return None
            h = captured.pop("h", None)
            if h is None:
                raise InterventionError(f"{self.in_hook} did not fire before {self.out_hook}")
            _check_width(act, self.d_model, "adapter factor b", self.out_hook)
            coeff = h @ self.a.to(device=h.device, dtype=h.dtype)  # [batch, pos]
            return act + self.scale * coeff.unsqueeze(-1).to(act.device) * self.b.to(device=act.device, dtype=act.dtype)

        return [(self.in_hook, read_input), (self.out_hook, add_update)]

    def metadata(self) -> dict[str, Any]:
        return {
            "type": self.kind, "layer": self.layer, "d_model": self.d_model, "d_mlp": self.d_mlp,
            "alpha": self.alpha, "in_hook": self.in_hook, "out_hook": self.out_hook, "model_name": self.model_name,
        }

    @classmethod
    def from_state(cls, meta: dict[str, Any], state: dict[str, Tensor]) -> "RankOneAdapter":
        adapter = cls(meta["layer"], meta["d_model"], meta["d_mlp"], meta["alpha"], meta["in_hook"], meta["out_hook"], None, meta.get("model_name"))
        with torch.no_grad():
            adapter.a.copy_(state["a"])
            adapter.b.copy_(state["b"])
        return adapter

    def extra_repr(self) -> str:
        return f"layer={self.layer}, d_model={self.d_model}, d_mlp={self.d_mlp}, alpha={self.alpha}, norm={self.norm:.4g}"


def load_intervention(path: str | Path, device: str | torch.device = "cpu") -> Intervention:
    """Load a saved :class:`SteeringVector` or :class:`RankOneAdapter`."""
    return Intervention.load(path, device)
