"""The intervention contract, and the paper's two original interventions.

* :class:`Intervention`: the base class every kind derives from. It says how it acts
  (:meth:`~Intervention.fwd_hooks`, :meth:`~Intervention.residual_offset`), knows its geometry
  (``flatten``, ``inner``, ``perturbed``, ``random_like``, ``scaled_to``, ``norm``) and saves
  to safetensors with JSON metadata; :func:`register_intervention` makes a kind loadable.
* :class:`SteeringVector` adds ``alpha * v`` to one hook point (by default the residual
  stream after layer L's MLP) at every position of every batch element.
* :class:`RankOneAdapter` adds a rank-1 update ``scale * b aᵀ`` to layer L's MLP
  down-projection, applied by hooks (the model's weights are never touched).

All are ``torch.nn.Module``s holding only their own parameters; the model stays frozen.
"""

from __future__ import annotations

import difflib
import json
import math
import re
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from jaxtyping import Float
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from emlens.geometry import baseline_generator, orthogonal_noise, rescale
from emlens.validation import with_file_suffix

HookFn = Callable[[Tensor, Any], Tensor | None]

HOOK_SHORTHANDS = {
    "resid_post": "blocks.{layer}.hook_resid_post",
    "resid_pre": "blocks.{layer}.hook_resid_pre",
    "resid_mid": "blocks.{layer}.hook_resid_mid",
    "mlp_out": "blocks.{layer}.hook_mlp_out",
    "attn_out": "blocks.{layer}.hook_attn_out",
}


class InterventionError(ValueError):
    """An intervention does not fit the model it is applied to, or a saved one cannot be read."""


class ModelMismatchWarning(UserWarning):
    """An intervention was trained on a model of another name (same shapes)."""


@dataclass(frozen=True)
class ResidualOffset:
    """How an intervention acts when it adds one fixed vector at ``hook`` at every position of every row."""

    hook: str
    vector: Tensor


INTERVENTION_TYPES: dict[str, type[Intervention]] = {}


def register_intervention(cls: type[Intervention]) -> type[Intervention]:
    """Class decorator: make ``cls`` loadable by :meth:`Intervention.load` under ``cls.kind``."""
    if cls.kind in INTERVENTION_TYPES and INTERVENTION_TYPES[cls.kind] is not cls:
        raise ValueError(f"an intervention kind {cls.kind!r} is already registered")
    INTERVENTION_TYPES[cls.kind] = cls
    return cls


def _check_finite(tensor: Tensor, what: str) -> None:
    if not bool(torch.isfinite(tensor).all()):
        raise InterventionError(f"{what} holds NaN or infinite values")


def _check_finite_number(value: float, what: str) -> float:
    value = float(value)
    if not math.isfinite(value):
        raise InterventionError(f"{what} must be a finite number, got {value}")
    return value


def _check_norm(norm: float) -> float:
    norm = float(norm)
    if not (math.isfinite(norm) and norm >= 0):
        raise InterventionError(f"a norm must be a finite number >= 0, got {norm}")
    return norm


def check_hook_name(model: Any, name: str) -> None:
    """Raise a clear error when ``name`` is not a hook point of ``model``, suggesting close names."""
    hook_dict = getattr(model, "hook_dict", None)
    if hook_dict is None:
        raise InterventionError(f"{type(model).__name__} has no hook_dict: not a TransformerLens-style model")
    if name not in hook_dict:
        close = difflib.get_close_matches(name, list(hook_dict), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise InterventionError(f"model has no hook point {name!r}{hint}")


def _check_hook_layer(hook: str, layer: int, what: str) -> None:
    """Refuse a hook name whose ``blocks.N.`` contradicts the intervention's layer (e.g. a hand-edited file)."""
    found = re.match(r"blocks\.(\d+)\.", hook)
    if found is not None and int(found.group(1)) != layer:
        raise InterventionError(
            f"{what} {hook!r} is at layer {found.group(1)}, but the intervention says layer {layer}; "
            "the two must agree (fix the layer or the hook name)"
        )


def _check_width(tensor: Tensor, expected: int, what: str, hook_name: str) -> None:
    if tensor.shape[-1] != expected:
        raise InterventionError(f"{what} has width {expected} but the activation at {hook_name} has width {tensor.shape[-1]}")


def input_output_hooks(
    owner: Intervention,
    in_name: str,
    out_name: str,
    read: Callable[[Tensor], Tensor],
    update: Callable[[Tensor, Tensor], Tensor],
) -> list[tuple[str, HookFn]]:
    """The hook pair of an edit to a module's output computed from its input (an adapter's ``x W + s · x A B``).

    While ``owner`` is enabled, the ``in_name`` hook keeps ``read(input)`` and the ``out_name`` hook returns
    ``update(kept, output)``; an output whose input hook did not fire first raises.
    """
    captured: dict[str, Tensor] = {}

    def read_input(act: Tensor, hook: Any) -> None:
        if owner.enabled:
            captured["h"] = read(act)
        return None

    def add_update(act: Tensor, hook: Any) -> Tensor | None:
        if not owner.enabled:
            return None
        h = captured.pop("h", None)
        if h is None:
            raise InterventionError(f"{in_name} did not fire before {out_name}")
        return update(h, act)

    return [(in_name, read_input), (out_name, add_update)]


class Intervention(nn.Module, ABC):
    """Base class: something that edits a model's forward pass through named hooks."""

    kind: ClassVar[str] = "intervention"

    def __init__(self, layer: int, model_name: str | None = None):
        super().__init__()
        if isinstance(layer, bool) or int(layer) != layer or layer < 0:
            raise InterventionError(f"layer must be an integer >= 0, got {layer!r}")
        self.layer = int(layer)
        self.model_name = model_name
        self.enabled = True
        self._applied_to: set[int] = set()  # ids of the models this intervention is applied to by applied()

    # --- how it acts ----------------------------------------------------------------------
    def residual_offset(self) -> ResidualOffset | None:
        """The vector this intervention adds at one hook at every position, if that is all it does.

        The runner may then add it straight to cached residuals; otherwise it applies
        :meth:`fwd_hooks` (through TransformerLens, or as PyTorch hooks at the same sites).
        """
        return None

    def acts_per_position(self) -> bool:
        """Whether its edit depends on where a token sits in its own sequence (a vector steering only some positions).

        Its hooks count positions along the sequence axis they see, which is each sequence's own only
        when the sequence runs alone: unpadded, unpacked and without a KV cache. The runner then runs
        every sequence alone through the hooked model (:meth:`emlens.runner.Runner.plain_blocker`).
        """
        return False

    # --- its geometry ---------------------------------------------------------------------
    @abstractmethod
    def flatten(self) -> Float[Tensor, " n"]:
        """One float32 CPU vector standing for this intervention (for PCA and trajectories)."""

    @abstractmethod
    def inner(self, other: Intervention) -> float:
        """Inner product with another intervention of the same kind and shape."""

    flat_geometry: ClassVar[bool] = False  # True where ``inner`` is the dot product of ``flatten``
    # True for an edit that is not a size (an ablation): a composition holding it leaves it out of its geometry
    # (norm, inner product, rescaling, noise, random counterpart) and keeps it as it is
    fixed_in_compositions: ClassVar[bool] = False

    def norm_modules(self) -> int | None:
        """How many modules :attr:`norm` is the mean over, where it is such a mean (a LoRA adapter's: the paper's
        size); None where it is a plain norm. A composition of such parts takes the mean over all their modules."""
        return None

    @classmethod
    def gram(cls, items: Sequence[Intervention]) -> Float[Tensor, "n n"]:
        """Pairwise :meth:`inner` products of interventions of this kind (float64), e.g. for a PCA.

        One matrix product where ``flatten`` carries the geometry; otherwise one :meth:`inner` per pair.
        """
        if cls.flat_geometry:
            flat = torch.stack([i.flatten().double() for i in items])
            return flat @ flat.T
        n = len(items)
        out = torch.zeros(n, n, dtype=torch.float64)
        for i in range(n):
            for j in range(i, n):
                out[i, j] = out[j, i] = items[i].inner(items[j])
        return out

    @abstractmethod
    def perturbed(self, epsilon: float, generator: torch.Generator | None = None) -> Intervention:
        """A copy under norm-preserving orthogonal noise ``sqrt(1-ε²)·x + ε·y`` (``y ⟂ x``, ``‖y‖ = ‖x‖``)."""

    @abstractmethod
    def random_like(self, seed: int = 0) -> Intervention:
        """An intervention of the same kind, site and norm pointing in a random direction."""

    def _check_same_kind(self, other: Intervention) -> None:
        if other.kind != self.kind:
            raise InterventionError(f"cannot compare a {self.kind} with a {other.kind}")

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

    @abstractmethod
    def norm_tensor(self) -> Float[Tensor, ""]:
        """:attr:`norm` as a detached scalar tensor on the intervention's device (read without a host sync)."""

    @property
    def norm(self) -> float:
        """Size of the intervention (vector norm, or Frobenius norm of the weight update)."""
        return float(self.norm_tensor())

    @property
    def fixed_scale(self) -> float:
        """The constant factor the trained parameters are multiplied by (``alpha``, rsLoRA's scale); 1 where there is none."""
        return 1.0

    @property
    def unscaled_norm(self) -> float:
        """:attr:`norm` without :attr:`fixed_scale` (the paper reports adapter norms both ways)."""
        return self.norm / abs(self.fixed_scale)

    @abstractmethod
    def scaled_to(self, norm: float) -> Intervention:
        """A copy with the same direction and the given norm."""

    def at_norm(self, norm: float) -> Intervention | None:
        """What a norm sweep runs at ``norm``: :meth:`scaled_to`, or None (the bare model) where that edits nothing,
        as at norm 0 of an intervention whose whole edit rescales."""
        return None if norm == 0 else self.scaled_to(norm)

    def check_model(self, model: Any, allow_other_model: bool = False) -> None:
        """Raise :class:`InterventionError` if this intervention cannot be applied to ``model``.

        Checks the layer range, every hook point, widths and finite values; a different model
        name (same shapes) warns, or passes silently with ``allow_other_model=True``.
        """
        cfg = getattr(model, "cfg", None)
        n_layers = getattr(cfg, "n_layers", None)
        if n_layers is not None and not 0 <= self.layer < n_layers:
            raise InterventionError(f"{self.kind} is at layer {self.layer}, but the model has layers 0-{n_layers - 1}")
        for name in self.hook_names():
            check_hook_name(model, name)
        for name, tensor in self.state_dict().items():
            _check_finite(tensor, f"{self.kind} parameter {name!r}")
        theirs = getattr(cfg, "model_name", None)
        if self.model_name and theirs and self.model_name != theirs and not allow_other_model:
            warnings.warn(
                f"{self.kind} was trained on {self.model_name!r} but is applied to {theirs!r} "
                "(shapes match; pass allow_other_model=True if this is intended)",
                ModelMismatchWarning,
                stacklevel=3,
            )

    # --- shared behaviour ---------------------------------------------------------
    @contextmanager
    def applied(self, model: Any) -> Iterator[Any]:
        """Context manager: the model runs with this intervention while inside it.

        Applying it again to the same model inside the block (nested ``applied``, or an emlens
        function that applies it itself) would add it twice, and raises :class:`InterventionError`.
        """
        self.check_model(model)
        self.refuse_if_applied(model)
        self._applied_to.add(id(model))
        try:
            with model.hooks(fwd_hooks=self.fwd_hooks()):
                yield model
        finally:
            self._applied_to.discard(id(model))

    def refuse_if_applied(self, model: Any) -> None:
        """Raise when this intervention is already applied to ``model`` by :meth:`applied` (it would act twice)."""
        if id(model) in self._applied_to:
            raise InterventionError(
                f"this {self.kind} is already applied to the model (inside `with ….applied(model)`); applying it again "
                "would add it twice. Nest no second applied(), and call emlens' functions (which apply it themselves) outside the block"
            )

    def __add__(self, other: Intervention) -> Intervention:
        """``a + b``: both interventions applied together (a :class:`~emlens.interventions.Composed`)."""
        if not isinstance(other, Intervention):
            return NotImplemented
        # the composed kind from the registry (emlens.interventions registers it): base needs no import of it
        return INTERVENTION_TYPES["composed"]([self, other])  # type: ignore[call-arg, arg-type]

    def __radd__(self, other: Any) -> Intervention:
        if isinstance(other, int) and other == 0:  # sum([a, b, c]) starts from 0
            return self
        return NotImplemented

    @contextmanager
    def disabled(self) -> Iterator[Intervention]:
        """Context manager: hooks stay registered but leave activations untouched."""
        previous, self.enabled = self.enabled, False
        try:
            yield self
        finally:
            self.enabled = previous

    def clone(self) -> Intervention:
        other = type(self).from_state(self.metadata(), {k: v.detach().clone() for k, v in self.state_dict().items()})
        return other

    def save(self, path: str | Path) -> Path:
        """Save to ``path`` (``.safetensors`` appended when it ends otherwise: ``kl=6.6`` → ``kl=6.6.safetensors``) with
        JSON metadata (type, model, layer, hooks, dims); returns the path written."""
        path = with_file_suffix(path, ".safetensors")
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(tensors, str(path), metadata={"emlens": json.dumps(self.metadata())})
        return path

    @staticmethod
    def load(path: str | Path, device: str | torch.device = "cpu") -> Intervention:
        """Load any saved intervention (its class comes from the registry); corrupt files raise one clear error."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no intervention file at {path}")
        if path.is_dir():
            raise InterventionError(f"{path} is a directory, not an intervention .safetensors file")
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as fh:
                header = (fh.metadata() or {}).get("emlens")
            state = load_file(str(path), device=str(device))
        except (SafetensorError, OSError, ValueError) as err:
            raise InterventionError(f"{path} is not a readable safetensors file (truncated or corrupt?): {err}") from err
        if header is None:
            raise InterventionError(f"{path} is not an emlens intervention (no 'emlens' metadata)")
        try:
            meta = json.loads(header)
        except json.JSONDecodeError as err:
            raise InterventionError(f"{path}: its 'emlens' metadata is not valid JSON ({err.msg})") from err
        if not isinstance(meta, dict):
            raise InterventionError(f"{path}: its 'emlens' metadata must be a JSON object")
        cls = INTERVENTION_TYPES.get(meta.get("type"))  # type: ignore[arg-type]
        if cls is None:
            raise InterventionError(f"{path}: unknown intervention type {meta.get('type')!r} (known: {sorted(INTERVENTION_TYPES)})")
        try:
            intervention = cls.from_state(meta, state)
        except KeyError as err:
            raise InterventionError(f"{path}: a {cls.kind} needs {err.args[0]!r}, which the file lacks") from err
        except (TypeError, ValueError, RuntimeError) as err:
            raise InterventionError(f"{path}: not a valid {cls.kind}: {err}") from err
        intervention.to(device)  # from_state copies into parameters made on the CPU: every kind lands on `device`
        for name, tensor in intervention.state_dict().items():
            _check_finite(tensor, f"{path}: {name!r}")
        if not math.isfinite(intervention.norm):
            raise InterventionError(
                f"{path}: the {cls.kind}'s norm overflows float32 (its values are too large to use); is the file corrupt?"
            )
        return intervention

    @classmethod
    @abstractmethod
    def from_state(cls, meta: dict[str, Any], state: dict[str, Tensor]) -> Intervention:
        """Rebuild from :meth:`metadata` and a state dict."""


def _resolve_hook(hook: str, layer: int) -> str:
    template = HOOK_SHORTHANDS.get(hook, hook)
    return template.format(layer=layer)


@register_intervention
class SteeringVector(Intervention):
    """One trainable vector added as ``alpha * v`` at a hook point, at every position of every batch element.

    Args:
        layer: layer index L.
        d_model: width of the vector (must equal the activation width at the hook).
        hook: hook name, ``"{layer}"`` template or shorthand (``"resid_post"`` default, ``"mlp_out"``...).
        positions: ``"all"`` or a list of token positions to steer, counted within each sequence:
            ``p >= 0`` is its ``p``-th token, ``p < 0`` its ``|p|``-th from the end (while sampling, the
            end of what has been generated so far). emlens runs such a vector one sequence at a time
            (padding, packing or a KV cache would shift the positions its hook counts); applied to a
            model by hand, it counts along the sequence axis of the activation its hook sees.
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
        _check_hook_layer(self.hook, self.layer, "hook")
        if positions != "all":
            positions = [int(p) for p in positions]
        self.positions = positions
        self.alpha = _check_finite_number(alpha, "alpha")
        if self.alpha == 0:
            raise InterventionError("alpha must not be 0 (the vector would have no effect and no direction)")
        if init is not None:
            init = torch.as_tensor(init, dtype=torch.float32).detach().clone()
            if init.shape != (self.d_model,):
                raise InterventionError(f"init has shape {tuple(init.shape)}, expected ({self.d_model},)")
            _check_finite(init, "steering vector init")
        self.vector = nn.Parameter(init if init is not None else torch.zeros(self.d_model))

    @classmethod
    def for_model(cls, model: Any, layer: int | None = None, **kwargs: Any) -> SteeringVector:
        """A zero vector sized for ``model`` at ``layer`` (default: the middle layer)."""
        layer = model.cfg.n_layers // 2 if layer is None else layer
        return cls(layer, model.cfg.d_model, model_name=getattr(model.cfg, "model_name", None), **kwargs)

    @classmethod
    def from_vector(cls, vector: Float[Tensor, " d_model"], layer: int, **kwargs: Any) -> SteeringVector:
        """Wrap a fixed effective vector (``alpha * v == vector``)."""
        alpha = float(kwargs.pop("alpha", 1.0))
        return cls(layer, vector.shape[-1], alpha=alpha, init=torch.as_tensor(vector).float() / alpha, **kwargs)

    @property
    def effective(self) -> Float[Tensor, " d_model"]:
        """The vector actually added: ``alpha * v``."""
        return self.alpha * self.vector

    def norm_tensor(self) -> Float[Tensor, ""]:
        return self.effective.detach().norm()

    @property
    def fixed_scale(self) -> float:
        return self.alpha

    @property
    def direction(self) -> Float[Tensor, " d_model"]:
        """Unit vector along the steering direction (zeros for a zero vector)."""
        eff = self.effective.detach()
        n = eff.norm()
        return eff / n if n > 0 else torch.zeros_like(eff)

    def scaled_to(self, norm: float) -> SteeringVector:
        """A copy pointing the same way with effective norm ``norm`` (>= 0)."""
        norm = _check_norm(norm)
        if self.norm == 0:
            raise InterventionError("cannot rescale a zero steering vector")
        return self.with_effective(self.direction * norm)

    def residual_offset(self) -> ResidualOffset | None:
        if self.positions != "all":
            return None
        return ResidualOffset(self.hook, self.effective)

    def acts_per_position(self) -> bool:
        return self.positions != "all"

    flat_geometry = True

    def flatten(self) -> Float[Tensor, " n"]:
        return self.effective.detach().float().cpu()

    def inner(self, other: Intervention) -> float:
        self._check_same_kind(other)
        mine, theirs = self.flatten(), other.flatten()
        if mine.shape != theirs.shape:
            raise InterventionError(f"vectors have different widths: {mine.numel()} and {theirs.numel()}")
        return float(mine @ theirs)

    def perturbed(self, epsilon: float, generator: torch.Generator | None = None) -> SteeringVector:
        return self.with_effective(orthogonal_noise(self.effective, epsilon, generator))

    def random_like(self, seed: int = 0) -> SteeringVector:
        gen = baseline_generator(seed)
        return self.with_effective(rescale(torch.randn(self.d_model, generator=gen), self.norm))

    def with_effective(self, vector: Float[Tensor, " d_model"]) -> SteeringVector:
        """A copy with the same settings and another effective vector."""
        if vector.shape != (self.d_model,):
            raise InterventionError(f"vector has shape {tuple(vector.shape)}, expected ({self.d_model},)")
        return SteeringVector(
            self.layer,
            self.d_model,
            self.hook,
            self.positions,
            self.alpha,
            init=vector.detach().float() / self.alpha,
            model_name=self.model_name,
        ).to(self.vector.device)

    def hook_names(self) -> list[str]:
        return [self.hook]

    def check_model(self, model: Any, allow_other_model: bool = False) -> None:
        super().check_model(model, allow_other_model)
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
            "type": self.kind,
            "layer": self.layer,
            "d_model": self.d_model,
            "hook": self.hook,
            "positions": self.positions,
            "alpha": self.alpha,
            "model_name": self.model_name,
        }

    @classmethod
    def from_state(cls, meta: dict[str, Any], state: dict[str, Tensor]) -> SteeringVector:
        return cls(
            meta["layer"],
            meta["d_model"],
            meta["hook"],
            meta["positions"],
            meta["alpha"],
            init=state["vector"],
            model_name=meta.get("model_name"),
        )

    def extra_repr(self) -> str:
        return f"layer={self.layer}, hook={self.hook!r}, d_model={self.d_model}, alpha={self.alpha}, norm={self.norm:.4g}"


@register_intervention
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
        self.alpha = _check_finite_number(alpha, "alpha")
        self.in_hook = (in_hook or self.IN_HOOKS[0]).format(layer=self.layer)
        self.out_hook = (out_hook or self.OUT_HOOKS[0]).format(layer=self.layer)
        _check_hook_layer(self.in_hook, self.layer, "in_hook")
        _check_hook_layer(self.out_hook, self.layer, "out_hook")
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        bound = 1.0 / math.sqrt(self.d_mlp)  # LoRA's default kaiming-uniform bound for A
        self.a = nn.Parameter((torch.rand(self.d_mlp, generator=gen) * 2 - 1) * bound)
        self.b = nn.Parameter(torch.zeros(self.d_model))

    @classmethod
    def for_model(cls, model: Any, layer: int | None = None, **kwargs: Any) -> RankOneAdapter:
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
    def fixed_scale(self) -> float:
        return self.scale

    def norm_tensor(self) -> Float[Tensor, ""]:
        """Frobenius norm of the effective weight update ``scale · b aᵀ`` (``|scale|``: a negative alpha flips the update, not its size)."""
        return abs(self.scale) * self.a.detach().norm() * self.b.detach().norm()

    def delta_weight(self) -> Float[Tensor, "d_model d_mlp"]:
        """The dense update to the down-projection weight (``out = W h``)."""
        return self.scale * torch.outer(self.b.detach(), self.a.detach())

    @property
    def direction(self) -> Float[Tensor, "d_model d_mlp"]:
        n = self.norm
        dw = self.delta_weight()
        return dw / n if n > 0 else dw

    def scaled_to(self, norm: float) -> RankOneAdapter:
        """A copy with the same direction and update norm ``norm`` (>= 0; ``b`` rescaled)."""
        norm = _check_norm(norm)
        if self.norm == 0:
            raise InterventionError("cannot rescale an adapter whose update is zero")
        return self.with_factors(self.a.detach(), self.b.detach() * (norm / self.norm))

    def flatten(self) -> Float[Tensor, " n"]:
        """The dense update ``scale · b aᵀ``, flattened (``d_model · d_mlp`` floats, float32, CPU).

        The same geometry as :meth:`inner`; PCA and cosines never form it (:meth:`gram`, :meth:`inner`).
        """
        return self.delta_weight().float().cpu().flatten()

    def inner(self, other: Intervention) -> float:
        """Frobenius inner product of the updates: ``s² (b1·b2)(a1·a2)``, no dense matrix needed."""
        self._check_same_kind(other)
        assert isinstance(other, RankOneAdapter)  # same kind
        if other.a.shape != self.a.shape or other.b.shape != self.b.shape:
            raise InterventionError("adapters have different shapes")
        a1, a2 = self.a.detach().float().cpu(), other.a.detach().float().cpu()
        b1, b2 = self.b.detach().float().cpu(), other.b.detach().float().cpu()
        return float(self.scale * other.scale * (b1 @ b2) * (a1 @ a2))

    @classmethod
    def gram(cls, items: Sequence[Intervention]) -> Float[Tensor, "n n"]:
        """Frobenius products of the updates, ``sᵢsⱼ (bᵢ·bⱼ)(aᵢ·aⱼ)``: two small matrix products, no dense update."""
        adapters = [i for i in items if isinstance(i, RankOneAdapter)]
        if len(adapters) != len(items):
            raise InterventionError("a Gram matrix of rank-1 adapters needs rank-1 adapters only")
        a = torch.stack([x.a.detach().double().cpu() for x in adapters])
        b = torch.stack([x.b.detach().double().cpu() for x in adapters])
        s = torch.tensor([x.scale for x in adapters], dtype=torch.float64)
        return (a @ a.T) * (b @ b.T) * torch.outer(s, s)

    def perturbed(self, epsilon: float, generator: torch.Generator | None = None) -> RankOneAdapter:
        """Each factor perturbed independently (the paper's rule for LoRA)."""
        return self.with_factors(orthogonal_noise(self.a, epsilon, generator), orthogonal_noise(self.b, epsilon, generator))

    def random_like(self, seed: int = 0) -> RankOneAdapter:
        gen = baseline_generator(seed)
        rand = self.with_factors(torch.randn(self.d_mlp, generator=gen), torch.randn(self.d_model, generator=gen))
        return rand.scaled_to(self.norm)

    def with_factors(self, a: Float[Tensor, " d_mlp"], b: Float[Tensor, " d_model"]) -> RankOneAdapter:
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

    def check_model(self, model: Any, allow_other_model: bool = False) -> None:
        super().check_model(model, allow_other_model)
        cfg = getattr(model, "cfg", None)
        if cfg is not None and (cfg.d_model != self.d_model or cfg.d_mlp != self.d_mlp):
            raise InterventionError(
                f"adapter has (d_model, d_mlp) = ({self.d_model}, {self.d_mlp}) but the model has ({cfg.d_model}, {cfg.d_mlp})"
            )

    def fwd_hooks(self) -> list[tuple[str, HookFn]]:
        def read(act: Tensor) -> Tensor:
            _check_width(act, self.d_mlp, "adapter factor a", self.in_hook)
            return act

        def update(h: Tensor, act: Tensor) -> Tensor:
            _check_width(act, self.d_model, "adapter factor b", self.out_hook)
            coeff = h @ self.a.to(device=h.device, dtype=h.dtype)  # [batch, pos]
            # the scale last: scale · (h·a) alone can overflow float16 (alpha 256) where the update itself does not
            return act + coeff.unsqueeze(-1).to(act.device) * self.b.to(device=act.device, dtype=act.dtype) * self.scale

        return input_output_hooks(self, self.in_hook, self.out_hook, read, update)

    def metadata(self) -> dict[str, Any]:
        return {
            "type": self.kind,
            "layer": self.layer,
            "d_model": self.d_model,
            "d_mlp": self.d_mlp,
            "alpha": self.alpha,
            "in_hook": self.in_hook,
            "out_hook": self.out_hook,
            "model_name": self.model_name,
        }

    @classmethod
    def from_state(cls, meta: dict[str, Any], state: dict[str, Tensor]) -> RankOneAdapter:
        adapter = cls(
            meta["layer"], meta["d_model"], meta["d_mlp"], meta["alpha"], meta["in_hook"], meta["out_hook"], None, meta.get("model_name")
        )
        for name, param in (("a", adapter.a), ("b", adapter.b)):
            if tuple(state[name].shape) != tuple(param.shape):  # copy_ would broadcast a length-1 factor silently
                raise InterventionError(f"saved factor {name} has shape {tuple(state[name].shape)}, expected {tuple(param.shape)}")
        with torch.no_grad():
            adapter.a.copy_(state["a"])
            adapter.b.copy_(state["b"])
        return adapter

    def extra_repr(self) -> str:
        return f"layer={self.layer}, d_model={self.d_model}, d_mlp={self.d_mlp}, alpha={self.alpha}, norm={self.norm:.4g}"


def load_intervention(path: str | Path, device: str | torch.device = "cpu") -> Intervention:
    """Load any saved intervention (:class:`SteeringVector`, :class:`RankOneAdapter`, ``LoRAAdapter``, ...)."""
    return Intervention.load(path, device)


def perturb(intervention: Intervention, epsilon: float, generator: torch.Generator | None = None) -> Intervention:
    """Norm-preserving orthogonal noise of strength ``epsilon`` on any intervention (its own rule)."""
    return intervention.perturbed(epsilon, generator)


def random_direction_like(intervention: Intervention, seed: int = 0) -> Intervention:
    """An intervention of the same kind, site and norm pointing in a random direction."""
    return intervention.random_like(seed)
