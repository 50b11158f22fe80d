"""LoRA of any rank on any of a decoder layer's seven projections, applied through hooks.

:class:`LoRAAdapter` adds ``scale · B A x`` to the output of each adapted projection (``A`` is
``rank × d_in``, ``B`` is ``d_out × rank``, exactly peft's ``lora_A.weight`` / ``lora_B.weight``),
reading the projection's input at its TransformerLens ``hook_in`` and adding to its ``hook_out``.
The model's weights are never touched. ``scale`` is ``alpha / sqrt(rank)`` (rsLoRA, the paper's
choice) or ``alpha / rank`` (plain LoRA), as in peft.

Geometry (one definition, used by every metric): an adapter *is* its set of dense updates
``ΔW_m = scale · B_m A_m``. ``inner`` is the Frobenius inner product summed over modules,
``flatten`` the updates concatenated (so cosines and PCA agree, and trading scale between ``A``
and ``B`` changes nothing), and ``norm`` the paper's size: the **mean** over modules of
``‖ΔW_m‖_F`` (for one module, ``norm² = inner(self, self)``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal

import torch
from jaxtyping import Float
from torch import Tensor, nn

from emlens.geometry import baseline_generator, orthogonal_noise
from emlens.interventions.base import (
    HookFn,
    Intervention,
    InterventionError,
    _check_finite_number,
    _check_norm,
    input_output_hooks,
    register_intervention,
)
from emlens.runner.architectures import PROJECTION_MODULES

# short name → (TransformerLens component under blocks.L, transformers module under layers.L); the
# runner maps each component's hook_in / hook_out to that module (emlens.runner.architectures)
_COMPONENTS = {"q": "attn.q", "k": "attn.k", "v": "attn.v", "o": "attn.o", "gate": "mlp.gate", "up": "mlp.in", "down": "mlp.out"}
PROJECTIONS: dict[str, tuple[str, str]] = {short: (component, PROJECTION_MODULES[component]) for short, component in _COMPONENTS.items()}
PROJECTION_ORDER = tuple(PROJECTIONS)
# the projections whose output is added to the residual stream (through Gemma's post-norms there)
RESIDUAL_WRITERS = ("o", "down")
PerturbFactors = Literal["both", "A", "B"]


def projection_name(name: str) -> str:
    """``"q"``, ``"q_proj"``, ``"up_proj"`` ... → the short name (``"q"``, ``"up"``)."""
    short = name[:-5] if name.endswith("_proj") else name
    if short not in PROJECTIONS:
        raise InterventionError(f"unknown projection {name!r}; choose from {', '.join(PROJECTION_ORDER)} (or their *_proj names)")
    return short


def site_key(layer: int, proj: str) -> str:
    """The key of one adapted module in the state dict: ``"{layer}_{proj}"``."""
    return f"{layer}_{proj}"


def model_projection_dims(model: Any, layer: int, proj: str) -> tuple[int, int]:
    """``(d_in, d_out)`` of projection ``proj`` in decoder layer ``layer`` of a bridge (read from the weight)."""
    from emlens.runner.core import runner_for

    try:
        module: Any = runner_for(model).layers[layer]
    except (NotImplementedError, TypeError, IndexError) as err:
        raise InterventionError(f"cannot find decoder layer {layer} of this model to adapt ({err})") from err
    for part in PROJECTIONS[proj][1].split("."):
        module = getattr(module, part, None)
        if module is None:
            raise InterventionError(f"layer {layer} of this model has no {PROJECTIONS[proj][1]} (no {proj!r} projection to adapt)")
    weight = module.weight
    return int(weight.shape[1]), int(weight.shape[0])


def _update_sq_norm(a: Tensor, b: Tensor) -> Tensor:
    """``‖B A‖_F²`` without forming ``B A`` (``d_out × d_in``): ``Σ (BᵀB) ⊙ (A Aᵀ)``, two ``r × r`` products."""
    return ((b.T @ b) * (a @ a.T)).sum().clamp_min(0)


@register_intervention
class LoRAAdapter(Intervention):
    """LoRA ``ΔW = scale · B A`` on projections ``modules`` of every layer in ``layers``, applied by hooks.

    Args:
        dims: ``{projection: (d_in, d_out)}`` for each adapted projection (``q k v o gate up down``).
        layers: the decoder layers adapted (each gets every projection in ``dims``).
        rank: ``r``; ``A`` is ``r × d_in`` (random, peft's kaiming-uniform), ``B`` is ``d_out × r`` (zero).
        alpha: ``lora_alpha``; the paper's rank-1 adapters use 256 with rsLoRA.
        rslora: scale ``alpha/sqrt(r)`` (True, the paper's) or ``alpha/r`` (False, plain LoRA).
        perturb: which factors :meth:`perturbed` perturbs by default: ``"both"`` (the paper's rule), ``"A"`` or ``"B"``.
        seed: seed for ``A``'s initialisation (None: torch's global generator).

    Use :meth:`for_model` to size one for a model.
    """

    kind = "lora_adapter"
    PERTURB_CHOICES: ClassVar[tuple[str, ...]] = ("both", "A", "B")

    def __init__(
        self,
        dims: Mapping[str, Sequence[int]],
        layers: int | Sequence[int],
        rank: int = 1,
        alpha: float = 256.0,
        rslora: bool = True,
        perturb: PerturbFactors = "both",
        seed: int | None = 0,
        model_name: str | None = None,
    ):
        layer_list = sorted({int(x) for x in ([layers] if isinstance(layers, int) else layers)})
        if not layer_list:
            raise InterventionError("a LoRA adapter needs at least one layer")
        super().__init__(layer_list[0], model_name)
        for x in layer_list:
            if x < 0:
                raise InterventionError(f"layers must be integers >= 0, got {x}")
        if not dims:
            raise InterventionError(f"a LoRA adapter needs at least one projection (from {', '.join(PROJECTION_ORDER)})")
        short = {projection_name(k): (int(v[0]), int(v[1])) for k, v in dims.items()}
        if isinstance(rank, bool) or int(rank) != rank or rank < 1:
            raise InterventionError(f"rank must be an integer >= 1, got {rank!r}")
        if perturb not in self.PERTURB_CHOICES:
            raise InterventionError(f"perturb must be one of {self.PERTURB_CHOICES}, got {perturb!r}")
        self.layers = layer_list
        self.projections = [p for p in PROJECTION_ORDER if p in short]
        self.dims = {p: short[p] for p in self.projections}
        for p, (d_in, d_out) in self.dims.items():
            if d_in < 1 or d_out < 1:
                raise InterventionError(f"projection {p!r} has dims ({d_in}, {d_out}); both must be >= 1")
        self.rank = int(rank)
        self.alpha = _check_finite_number(alpha, "alpha")
        self.rslora = bool(rslora)
        self.perturb: PerturbFactors = perturb
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        self.A = nn.ParameterDict()
        self.B = nn.ParameterDict()
        for layer, proj in self.sites():
            d_in, d_out = self.dims[proj]
            bound = 1.0 / math.sqrt(d_in)  # peft's default: kaiming_uniform_(a=sqrt(5)) on lora_A
            key = site_key(layer, proj)
            self.A[key] = nn.Parameter((torch.rand(self.rank, d_in, generator=gen) * 2 - 1) * bound)
            self.B[key] = nn.Parameter(torch.zeros(d_out, self.rank))

    # --- construction -----------------------------------------------------------------------
    @classmethod
    def for_model(
        cls,
        model: Any,
        layers: int | Sequence[int] | Literal["all"] | None = None,
        modules: Sequence[str] = ("down",),
        **kwargs: Any,
    ) -> LoRAAdapter:
        """An adapter sized for ``model`` on ``modules`` (default: the MLP down-projection) of ``layers``
        (default: the middle layer; ``"all"`` for every layer)."""
        n_layers = model.cfg.n_layers
        if layers is None:
            chosen = [n_layers // 2]
        elif isinstance(layers, str):
            if layers != "all":
                raise InterventionError(f"layers must be a layer, a list of layers or 'all', got {layers!r}")
            chosen = list(range(n_layers))
        else:
            chosen = [int(layers)] if isinstance(layers, int) else [int(x) for x in layers]
        for x in chosen:
            if not 0 <= x < n_layers:
                raise InterventionError(f"layer {x} is out of range: the model has layers 0-{n_layers - 1}")
        if not chosen:
            raise InterventionError("a LoRA adapter needs at least one layer")
        dims = {projection_name(m): model_projection_dims(model, chosen[0], projection_name(m)) for m in modules}
        kwargs.setdefault("model_name", getattr(model.cfg, "model_name", None))
        return cls(dims, chosen, **kwargs)

    @classmethod
    def from_rank_one(cls, adapter: Any) -> LoRAAdapter:
        """The same update as a :class:`~emlens.interventions.RankOneAdapter` (rank 1, ``down``, rsLoRA, same alpha)."""
        lora = cls(
            {"down": (adapter.d_mlp, adapter.d_model)}, [adapter.layer], 1, adapter.alpha, True, seed=None, model_name=adapter.model_name
        )
        key = site_key(adapter.layer, "down")
        with torch.no_grad():
            lora.A[key].copy_(adapter.a.detach().unsqueeze(0))
            lora.B[key].copy_(adapter.b.detach().unsqueeze(1))
        return lora.to(adapter.a.device)

    def to_rank_one(self) -> Any:
        """This adapter as a :class:`~emlens.interventions.RankOneAdapter` (it must be rank 1 on one ``down``)."""
        from emlens.interventions.base import RankOneAdapter

        if self.rank != 1 or self.projections != ["down"] or len(self.layers) != 1:
            raise InterventionError("only a rank-1 adapter of one layer's down-projection is a RankOneAdapter")
        d_in, d_out = self.dims["down"]
        adapter = RankOneAdapter(self.layer, d_out, d_in, alpha=self.scale, seed=None, model_name=self.model_name)
        key = site_key(self.layer, "down")
        with torch.no_grad():
            adapter.a.copy_(self.A[key].detach()[0])
            adapter.b.copy_(self.B[key].detach()[:, 0])
        return adapter.to(self.A[key].device)

    def sites(self) -> list[tuple[int, str]]:
        """``(layer, projection)`` of every adapted module, in a fixed order (layers, then q k v o gate up down)."""
        return [(layer, proj) for layer in self.layers for proj in self.projections]

    def factors(self, layer: int, proj: str) -> tuple[Float[Tensor, "r d_in"], Float[Tensor, "d_out r"]]:
        """``(A, B)`` of one module (the parameters themselves)."""
        key = site_key(layer, proj)
        return self.A[key], self.B[key]

    @property
    def scale(self) -> float:
        """``alpha / sqrt(rank)`` (rsLoRA) or ``alpha / rank``."""
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    # --- geometry -------------------------------------------------------------------------------
    def _sq_norms(self) -> Float[Tensor, " n_modules"]:
        """``‖B A‖_F²`` per module (unscaled) without forming ``B A``: ``Σ (BᵀB) ⊙ (A Aᵀ)``."""
        return torch.stack([_update_sq_norm(self.A[key].detach(), self.B[key].detach()) for key in self.A])

    def module_norms(self) -> dict[tuple[int, str], float]:
        """``‖scale · B A‖_F`` of every module."""
        norms = (abs(self.scale) * self._sq_norms().sqrt()).tolist()
        return dict(zip(self.sites(), norms))

    def norm_tensor(self) -> Float[Tensor, ""]:
        """The paper's size: the mean over modules of ``‖scale · B A‖_F``."""
        return abs(self.scale) * self._sq_norms().sqrt().mean()

    def norm_modules(self) -> int:
        return len(self.A)

    @property
    def fixed_scale(self) -> float:
        return self.scale

    @property
    def unscaled_norm(self) -> float:
        """The mean over modules of ``‖B A‖_F`` (:attr:`norm` without the scale)."""
        return float(self._sq_norms().sqrt().mean())

    def delta_weight(self, layer: int, proj: str) -> Float[Tensor, "d_out d_in"]:
        """The dense update ``scale · B A`` of one module (``out = W x``, like ``nn.Linear.weight``)."""
        a, b = self.factors(layer, proj)
        return self.scale * (b.detach() @ a.detach())

    def flatten(self) -> Float[Tensor, " n"]:
        """The dense updates ``scale · B A`` of every module, flattened and concatenated (float32, CPU).

        Its size is ``Σ d_out·d_in`` floats: fine for a few modules, large for many layers of a big
        model; :meth:`inner` (hence cosine similarities) never forms it.
        """
        return torch.cat([self.delta_weight(layer, proj).float().cpu().flatten() for layer, proj in self.sites()])

    def _check_compatible(self, other: Intervention) -> LoRAAdapter:
        self._check_same_kind(other)
        assert isinstance(other, LoRAAdapter)
        if other.sites() != self.sites() or other.dims != self.dims:
            raise InterventionError(
                f"LoRA adapters on different modules or shapes: {self.sites()} {self.dims} vs {other.sites()} {other.dims}"
            )
        return other

    def inner(self, other: Intervention) -> float:
        """Frobenius inner product of the updates, summed over modules: ``s₁s₂ Σ (B₁ᵀB₂) ⊙ (A₁A₂ᵀ)`` (no dense matrix).

        Adapters of different ranks (same modules and shapes) can be compared.
        """
        theirs = self._check_compatible(other)
        total = 0.0
        for key in self.A:
            a1, b1 = self.A[key].detach().double().cpu(), self.B[key].detach().double().cpu()
            a2, b2 = theirs.A[key].detach().double().cpu(), theirs.B[key].detach().double().cpu()
            total += float(((b1.T @ b2) * (a1 @ a2.T)).sum())
        return self.scale * theirs.scale * total

    def perturbed(self, epsilon: float, generator: torch.Generator | None = None, factors: PerturbFactors | None = None) -> LoRAAdapter:
        """Norm-preserving orthogonal noise on ``A``, ``B`` or both (default: :attr:`perturb`), each module independently.

        Per module, in :meth:`sites` order, ``A`` then ``B`` draw from ``generator``, each factor perturbed with
        its own norm kept (the paper's rule for LoRA). At rank 1 that keeps each module's update norm
        ``‖s·B A‖`` exactly; at higher rank it does not (the update's norm depends on ``BᵀB``, not only on the
        factors' norms), so ``B`` is then rescaled to give every module its update norm back: the noise changes
        the update's direction only, as it does for a steering vector.
        """
        factors = self.perturb if factors is None else factors
        if factors not in self.PERTURB_CHOICES:
            raise InterventionError(f"factors must be one of {self.PERTURB_CHOICES}, got {factors!r}")
        new_a, new_b = {}, {}
        for key in self.A:
            a, b = self.A[key].detach(), self.B[key].detach()
            new_a[key] = orthogonal_noise(a.flatten(), epsilon, generator).view(a.shape) if factors in ("both", "A") else a
            new_b[key] = orthogonal_noise(b.flatten(), epsilon, generator).view(b.shape) if factors in ("both", "B") else b
            if self.rank > 1:
                before = float(_update_sq_norm(a.double(), b.double()).sqrt())
                after = float(_update_sq_norm(new_a[key].double(), new_b[key].double()).sqrt())
                if after > 0:
                    new_b[key] = new_b[key] * (before / after)
        return self.with_factors(new_a, new_b)

    def random_like(self, seed: int = 0) -> LoRAAdapter:
        """Gaussian ``A`` and ``B`` of the same rank, each module rescaled to this adapter's norm there."""
        gen = baseline_generator(seed)
        norms = self.module_norms()
        new_a, new_b = {}, {}
        for layer, proj in self.sites():
            d_in, d_out = self.dims[proj]
            key = site_key(layer, proj)
            a = torch.randn(self.rank, d_in, generator=gen)
            b = torch.randn(d_out, self.rank, generator=gen)
            size = float(abs(self.scale) * (b @ a).norm())
            new_a[key], new_b[key] = a, b * (norms[(layer, proj)] / size)
        return self.with_factors(new_a, new_b)

    def scaled_to(self, norm: float) -> LoRAAdapter:
        """A copy with every module's update scaled by one factor so that :attr:`norm` is ``norm`` (``B`` rescaled)."""
        norm = _check_norm(norm)
        current = self.norm
        if current == 0:
            raise InterventionError("cannot rescale a LoRA adapter whose update is zero")
        factor = norm / current
        return self.with_factors({k: v.detach() for k, v in self.A.items()}, {k: v.detach() * factor for k, v in self.B.items()})

    def with_factors(self, a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> LoRAAdapter:
        """A copy with the same settings and other factors (``{site key: A}``, ``{site key: B}``; rank may change)."""
        ranks = {int(t.shape[0]) for t in a.values()}
        if set(a) != set(self.A) or set(b) != set(self.B) or len(ranks) != 1:
            raise InterventionError(f"factors must be given for exactly the modules {list(self.A)}, all of one rank")
        rank = ranks.pop()
        other = LoRAAdapter(self.dims, self.layers, rank, self.alpha, self.rslora, self.perturb, None, self.model_name)
        if rank != self.rank:  # keep the scale: alpha follows the rank
            other.alpha = self.scale * (math.sqrt(rank) if self.rslora else rank)
        with torch.no_grad():
            for key in self.A:
                if a[key].shape != other.A[key].shape or b[key].shape != other.B[key].shape:
                    raise InterventionError(
                        f"module {key}: factors have shapes {tuple(a[key].shape)}, {tuple(b[key].shape)}; "
                        f"expected {tuple(other.A[key].shape)}, {tuple(other.B[key].shape)}"
                    )
                other.A[key].copy_(a[key])
                other.B[key].copy_(b[key])
        return other.to(next(iter(self.A.values())).device)

    # --- how it acts ------------------------------------------------------------------------------
    def _hook_name(self, layer: int, proj: str, end: str) -> str:
        return f"blocks.{layer}.{PROJECTIONS[proj][0]}.hook_{end}"

    def hook_names(self) -> list[str]:
        return [self._hook_name(layer, proj, end) for layer, proj in self.sites() for end in ("in", "out")]

    def check_model(self, model: Any, allow_other_model: bool = False) -> None:
        super().check_model(model, allow_other_model)
        n_layers = getattr(getattr(model, "cfg", None), "n_layers", None)
        if n_layers is not None and self.layers[-1] >= n_layers:
            raise InterventionError(f"{self.kind} adapts layer {self.layers[-1]}, but the model has layers 0-{n_layers - 1}")
        if hasattr(model, "original_model"):
            for proj, dims in self.dims.items():
                for layer in self.layers:
                    found = model_projection_dims(model, layer, proj)
                    if found != dims:
                        raise InterventionError(
                            f"adapter's {proj!r} projection has (d_in, d_out) = {dims}, but layer {layer} of the model has {found}"
                        )

    def fwd_hooks(self) -> list[tuple[str, HookFn]]:
        hooks: list[tuple[str, HookFn]] = []
        for layer, proj in self.sites():
            hooks += self._module_hooks(layer, proj)
        return hooks

    def _module_hooks(self, layer: int, proj: str) -> list[tuple[str, HookFn]]:
        key = site_key(layer, proj)
        d_in, d_out = self.dims[proj]
        in_name, out_name = self._hook_name(layer, proj, "in"), self._hook_name(layer, proj, "out")

        def read(act: Tensor) -> Tensor:
            # TransformerLens shows o_proj's input split into heads: [..., n_heads, d_head]
            h = act if act.shape[-1] == d_in else act.flatten(-2)
            if h.shape[-1] != d_in:
                raise InterventionError(
                    f"LoRA factor A of {key} has width {d_in} but the activation at {in_name} has shape {tuple(act.shape)}"
                )
            return h

        def update(h: Tensor, act: Tensor) -> Tensor:
            a = self.A[key].to(device=h.device, dtype=h.dtype)
            b = self.B[key].to(device=act.device, dtype=act.dtype)
            delta = (h @ a.T).to(act.device) @ b.T * self.scale
            if act.shape[-1] != d_out:  # q/k/v outputs shown split into heads: [..., n_heads, d_head]
                if act.ndim < 2 or act.shape[-2] * act.shape[-1] != d_out:
                    raise InterventionError(
                        f"LoRA factor B of {key} has height {d_out} but the activation at {out_name} has shape {tuple(act.shape)}"
                    )
                delta = delta.view(act.shape)
            return act + delta

        return input_output_hooks(self, in_name, out_name, read, update)

    # --- saving ---------------------------------------------------------------------------------
    def metadata(self) -> dict[str, Any]:
        return {
            "type": self.kind,
            "layer": self.layer,
            "layers": self.layers,
            "dims": {p: list(d) for p, d in self.dims.items()},
            "rank": self.rank,
            "alpha": self.alpha,
            "rslora": self.rslora,
            "perturb": self.perturb,
            "hooks": self.hook_names(),
            "model_name": self.model_name,
        }

    @classmethod
    def from_state(cls, meta: dict[str, Any], state: dict[str, Tensor]) -> LoRAAdapter:
        adapter = cls(
            meta["dims"],
            meta["layers"],
            meta["rank"],
            meta["alpha"],
            meta.get("rslora", True),
            meta.get("perturb", "both"),
            None,
            meta.get("model_name"),
        )
        if int(meta["layer"]) != adapter.layer:
            raise InterventionError(f"layer {meta['layer']} contradicts layers {adapter.layers}")
        expected = set(adapter.state_dict())
        if set(state) != expected:
            missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
            raise InterventionError(f"LoRA tensors do not match its settings (missing {missing}, unexpected {extra})")
        adapter.load_state_dict(state)
        return adapter

    def extra_repr(self) -> str:
        return (
            f"layers={self.layers}, modules={self.projections}, rank={self.rank}, alpha={self.alpha}, "
            f"{'rslora' if self.rslora else 'lora'} scale={self.scale:.4g}, norm={self.norm:.4g}"
        )
