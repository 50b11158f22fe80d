"""The runner: one object that owns how a model is executed, for every consumer.

Two paths compute the same numbers:

* **hooked**: the TransformerLens bridge runs the whole model and the intervention acts through
  its hook points. Always correct; the reference every other path is tested against.
* **fast**: work below the intervention is done once and cached (residuals entering the first
  block the intervention can change); the blocks above run as the plain transformers layers
  under the bridge (padding-free where the architecture allows, compiled on large models), with
  the intervention either added straight to the cached residual (a residual offset) or applied
  by plain PyTorch hooks at the same sites.

:meth:`Runner.plan` picks the fast path only when it can vouch for equality: a proved
architecture (:mod:`emlens.runner.architectures`), an intervention whose every site maps to a
plain module, and no hook on the model that emlens did not register (a user's hook would be
skipped by the fast path). Otherwise it plans the hooked path, and :class:`Plan` says why.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Literal, no_type_check

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from emlens.data import ChatBatch
from emlens.runner.architectures import Architecture
from emlens.runner.packed import CompiledBlocks, Packing, mask_lengths, pack, run_packed
from emlens.runner.plain import decoder_stack, foreign_hooks, site_hooks, unwrap
from emlens.runner.transfer import to_device
from emlens.scoring import nll_sum_unchecked, softcapped

Path = Literal["offset", "prefix", "hooked"]


@dataclass(frozen=True)
class Plan:
    """How a consumer runs one intervention.

    ``path``: ``"offset"`` (vector added to cached residuals after block ``cut - 1``),
    ``"prefix"`` (cached residuals entering block ``cut``, plain hooks above), or ``"hooked"``
    (the whole model through TransformerLens hooks). ``reason`` says why this path was chosen.
    """

    path: Path
    cut: int
    reason: str

    @property
    def fast(self) -> bool:
        return self.path != "hooked"

    def describe(self) -> str:
        where = f" (cached below block {self.cut})" if self.fast else ""
        return f"{self.path} path{where}: {self.reason}"


class _Stop(Exception):
    pass


class _Skip(nn.Module):
    """Stands in for a decoder layer whose output is replaced anyway: returns its input."""

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return hidden_states


class Runner:
    """Executes one TransformerLens bridge; get it with :func:`runner_for`, never build two per model."""

    def __init__(self, model: Any):
        if not hasattr(model, "original_model"):
            raise TypeError(f"emlens runs TransformerLens bridges (with .original_model), not {type(model).__name__}")
        from emlens.versions import check_versions

        check_versions()
        self._model = weakref.ref(model)  # weak: the table of runners (runner_for) must not keep the model alive
        self.hf = model.original_model
        self.arch = Architecture.of(self.hf.config)
        self._plain: Any = None
        self._compiled: CompiledBlocks | None = None
        self._running = 0  # how many of this runner's applied() blocks are open (a callback inside one must not plan)
        self.last_plan: Plan | None = None

    @property
    def model(self) -> Any:
        """The bridge this runner executes."""
        model = self._model()
        if model is None:
            raise RuntimeError("this runner's model was freed")
        return model

    # --- the plain model -------------------------------------------------------------
    @property
    def plain(self) -> Any:
        """The transformers model without TransformerLens' wrappers (shared weights), built once."""
        if self._plain is None:
            self._plain = unwrap(self.hf)
        return self._plain

    @property
    def decoder(self) -> Any:
        return decoder_stack(self.plain)

    @property
    def layers(self) -> list[nn.Module]:
        return list(self.decoder.layers)

    @property
    def compiled(self) -> CompiledBlocks:
        if self._compiled is None:
            self._compiled = CompiledBlocks(sum(p.numel() for p in self.decoder.layers.parameters()))
        return self._compiled

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # --- planning ----------------------------------------------------------------------
    def plan(self, intervention: Any | None, cache_prefix: bool = True, check: bool = True) -> Plan:
        """The path a consumer takes for ``intervention`` (None: the base model)."""
        self.refuse_if_running()
        if intervention is not None and check:
            intervention.check_model(self.model)
        if intervention is not None:
            intervention.refuse_if_applied(self.model)
        plan = self._choose(intervention, cache_prefix)
        self.last_plan = plan
        return plan

    def refuse_if_running(self) -> None:
        """Refuse to plan a run while one of this runner's :meth:`applied` blocks has hooks on the model's modules."""
        if self._running:
            from emlens.interventions.base import InterventionError

            # its hooks sit on the modules, unmarked: a nested consumer would run the edit twice, or call it the base
            raise InterventionError(
                "emlens is running an intervention on this model right now (are you inside a callback such as train()'s "
                "on_step?); its edit is active on the model's modules as hooks, so a measurement or sample made here "
                "would count it twice or read it as the base model. Measure after training, or from a checkpoint."
            )

    def plain_blocker(self, intervention: Any | None) -> str | None:
        """Why the plain transformers modules cannot stand in for the bridge here (None: they can).

        The one rule behind every fast path, sampling's included: a proved architecture, no hook
        that emlens did not register, and a plain-module site for each of the intervention's hooks.
        """
        if intervention is not None and intervention.acts_per_position():
            return "its positions count within each sequence: every sequence runs alone, unpadded, through the hooked model"
        if not self.arch.proved:
            return f"architecture {self.arch.model_type!r} is not proved equal on the plain modules"
        foreign = foreign_hooks(self.model)
        if foreign:
            shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
            return f"hooks that emlens did not register are on the model ({shown}); the plain modules would skip them"
        missing = [n for n in (intervention.hook_names() if intervention is not None else []) if self.arch.site(n) is None]
        if missing:
            return f"hook point(s) {', '.join(missing)} have no proved plain-module site on {self.arch.model_type}"
        return None

    def _choose(self, intervention: Any | None, cache_prefix: bool) -> Plan:
        if not cache_prefix:
            return Plan("hooked", 0, "the fast path was switched off (cache_prefix=False)")
        offset = intervention.residual_offset() if intervention is not None else None
        layer = self.arch.residual_layer(offset.hook) if offset is not None and self.arch.proved else None
        blocker = self.plain_blocker(intervention if layer is None else None)
        if blocker is not None:
            return Plan("hooked", 0, blocker)
        if intervention is None:
            return Plan("prefix", self.arch.n_layers, "base model: blocks run once, plain")
        if offset is not None and layer is not None:
            return Plan("offset", layer + 1, f"{offset.hook} adds one vector to the residual after block {layer}")
        first = min(site.layer for site in (self.arch.site(n) for n in intervention.hook_names()) if site is not None)
        return Plan("prefix", first, "every hook point maps to a plain module")

    # --- applying an intervention -------------------------------------------------------
    @contextmanager
    def applied(self, intervention: Any | None, plan: Plan) -> Iterator[None]:
        """The intervention is active on ``plan``'s path while inside (offsets are added by :meth:`hidden`). While its
        hooks are on the model's modules (the hooked and prefix paths) no consumer may plan another run of this model
        (:meth:`plan` and sampling refuse); an offset, or the base model, leaves the modules as they are."""
        if intervention is None or plan.path == "offset":
            yield
            return
        self._running += 1
        try:
            if plan.path == "hooked":
                with self.model.hooks(fwd_hooks=intervention.fwd_hooks()):
                    yield
            else:
                with site_hooks(self.plain, self.arch, intervention.fwd_hooks()):
                    yield
        finally:
            self._running -= 1

    @staticmethod
    def offset_vector(intervention: Any | None, plan: Plan) -> Tensor | None:
        """The vector the offset path adds (None when disabled or on another path)."""
        if intervention is None or plan.path != "offset" or not getattr(intervention, "enabled", True):
            return None
        found = intervention.residual_offset()
        return None if found is None else found.vector

    # --- the two halves of the fast path ----------------------------------------------------
    @torch.no_grad()
    def residual(
        self, input_ids: Int[Tensor, "batch seq"], attention_mask: Int[Tensor, "batch seq"], cut: int
    ) -> Float[Tensor, "total d_model"]:
        """The residual entering block ``cut`` at the real tokens of a right-padded batch, packed (no padding).

        Give host (CPU) tensors where possible: packing them there costs the GPU no sync.
        """
        _check_right_padded(attention_mask)
        dev = self.device
        if self.arch.packable:
            packing = Packing.from_mask(attention_mask, dev)
            embedded = self.decoder.embed_tokens(to_device(pack(input_ids, attention_mask), dev))
            return run_packed(self.plain, self.compiled.layers(self.layers[:cut]), embedded, packing, final_norm=False)
        store: dict[str, Tensor] = {}

        def grab(module: nn.Module, args: tuple, kwargs: dict) -> None:
            store["resid"] = (args[0] if args else kwargs["hidden_states"]).detach()
            raise _Stop

        target = self.decoder.layers[cut] if cut < self.arch.n_layers else self.decoder.norm
        handle = target.register_forward_pre_hook(grab, with_kwargs=True)
        try:
            self.decoder(input_ids=to_device(input_ids, dev), attention_mask=None, use_cache=False)
        except _Stop:
            pass
        finally:
            handle.remove()
        resid = store["resid"]
        return resid.flatten(0, 1).index_select(0, to_device(_flat_real(mask_lengths(attention_mask), resid.shape[1]), resid.device))

    def hidden(
        self, residual: Float[Tensor, "total d_model"], lengths: list[int], cut: int, offset: Tensor | None = None
    ) -> Float[Tensor, "total d_model"]:
        """Final-normed hidden states of blocks ``cut``… run on packed ``residual`` (plus ``offset``), plain."""
        if offset is not None:
            residual = residual + offset.to(device=residual.device, dtype=residual.dtype)
        if self.arch.packable:
            packing = Packing.from_lengths(lengths, residual.device)
            return run_packed(self.plain, self.compiled.layers(self.layers[cut:]), residual, packing)
        width = max(lengths)
        real = to_device(_flat_real(lengths, width), residual.device)
        padded = residual.new_zeros((len(lengths) * width, residual.shape[-1])).index_copy(0, real, residual)
        padded = padded.view(len(lengths), width, -1)
        if cut >= self.arch.n_layers:
            normed = self.decoder.norm(padded)  # on the norm's device: another GPU where device_map split the model
            return normed.flatten(0, 1).index_select(0, real.to(normed.device))
        stack = [_Skip() for _ in range(cut)] + self.layers[cut:]

        def feed(module: nn.Module, args: tuple, kwargs: dict) -> Any:
            if args:
                return (padded, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": padded}

        decoder = self.decoder
        full = decoder._modules["layers"]
        handle = stack[cut].register_forward_pre_hook(feed, with_kwargs=True)
        decoder._modules["layers"] = nn.ModuleList(stack)
        try:
            # right padding + causal attention: no real token sees padding, so no mask is needed
            out = decoder(inputs_embeds=padded, attention_mask=None, use_cache=False).last_hidden_state
        finally:
            decoder._modules["layers"] = full
            handle.remove()
        return out.flatten(0, 1).index_select(0, real.to(out.device))  # out: on the last block's device

    def unembed(self, hidden: Float[Tensor, "n d_model"]) -> Float[Tensor, "n vocab"]:
        """Logits of final-normed hidden states (with the model's final logit soft-cap, if any)."""
        return softcapped(self.plain.get_output_embeddings()(hidden), self.arch.final_logit_softcap)

    def nll_sum(self, hidden: Float[Tensor, "n d_model"], targets: Int[Tensor, " n"]) -> Float[Tensor, ""]:
        """Summed next-token NLL of ``hidden`` (compiled with the blocks on large models)."""
        fn = self.compiled.function(_unembed_nll_sum, hidden.device)
        return fn(self.plain.get_output_embeddings(), hidden, targets.to(hidden.device), self.arch.final_logit_softcap)

    # --- what consumers call --------------------------------------------------------------
    def logits(
        self,
        batch: ChatBatch,
        rows: Bool[Tensor, "batch seq"],
        intervention: Any | None,
        plan: Plan,
        residual: Float[Tensor, "total d_model"] | None = None,
    ) -> Float[Tensor, "n_rows vocab"]:
        """Logits at positions ``rows`` (row-major) with ``intervention`` active (inside :meth:`applied`).

        On a fast plan, ``residual`` is the cached residual entering block ``plan.cut`` at the
        batch's real tokens (computed here when not given). ``batch`` and ``rows`` may stay on
        the host: the runner moves what it needs without stalling the GPU.
        """
        dev = self.device
        if plan.path == "hooked":
            if intervention is not None and intervention.acts_per_position():
                return self._logits_alone(batch, rows)
            logits = self.model(to_device(batch.input_ids, dev), attention_mask=to_device(batch.attention_mask, dev))
            return logits.flatten(0, 1).index_select(0, to_device(rows.flatten().nonzero().squeeze(1), logits.device))
        if residual is None:
            residual = self.residual(batch.input_ids, batch.attention_mask, plan.cut)
        return self.logits_fused([(batch, rows, residual)], intervention, plan)[0]

    def _logits_alone(self, batch: ChatBatch, rows: Bool[Tensor, "batch seq"]) -> Float[Tensor, "n_rows vocab"]:
        """:meth:`logits` on the hooked model, each sequence run alone without its padding (so an intervention that
        counts positions counts each sequence's own); row-major, as the batched forward gives them."""
        real = batch.attention_mask.bool().cpu()
        rows = rows.cpu()
        if bool((rows & ~real).any()):
            raise ValueError("logits were asked at padding positions")
        out = []
        for r in range(real.shape[0]):
            if not bool(rows[r].any()):
                continue
            ids = batch.input_ids[r].cpu()[real[r]][None]
            logits = self.model(to_device(ids, self.device))[0]
            out.append(logits.index_select(0, to_device(rows[r][real[r]].nonzero().squeeze(1), logits.device)))
        if not out:
            return torch.zeros(0, self.model.cfg.d_vocab, device=self.device)
        return torch.cat([o.to(out[0].device) for o in out])

    def logits_fused(
        self,
        parts: list[tuple[ChatBatch, Tensor, Tensor]],
        intervention: Any | None,
        plan: Plan,
    ) -> list[Tensor]:
        """:meth:`logits` of several batches ``(batch, rows, cached residual)`` from one forward of their packed tokens.

        Each part is a right-padded batch, its ``rows`` (``[batch, seq]``, bool) and the cached residual
        entering block ``plan.cut`` at its real tokens (``[total, d_model]``); each result is ``[n_rows, vocab]``.

        Fast plans only. Packed sequences never attend to each other, so each part's logits equal
        its own :meth:`logits` call up to float rounding (what a larger matrix product changes);
        training fuses the micro-batches of a step this way, so small micro-batches fill the device.
        """
        if not plan.fast:
            raise ValueError(f"fused forwards need a fast plan, not the {plan.describe()}")
        lengths = [n for batch, _, _ in parts for n in batch_lengths(batch)]
        residual = torch.cat([resid for _, _, resid in parts]) if len(parts) > 1 else parts[0][2]
        hidden = self.hidden(residual, lengths, plan.cut, self.offset_vector(intervention, plan))
        out = []
        for (batch, rows, _), piece in zip(parts, hidden.split([resid.shape[0] for _, _, resid in parts])):
            out.append(self.unembed(piece.index_select(0, self.packed_rows(batch, rows, piece.device))))
        return out

    @staticmethod
    def packed_rows(batch: ChatBatch, rows: Bool[Tensor, "batch seq"], device: str | torch.device) -> Int[Tensor, " n_rows"]:
        """Where positions ``rows`` of ``batch`` lie among its packed real tokens (an index on ``device``)."""
        return to_device(rows[batch.attention_mask.bool()].nonzero().squeeze(1), device)


@no_type_check  # compiled (CompiledBlocks.function): no run-time type checks inside, see emlens.scoring
def _unembed_nll_sum(head: nn.Module, hidden: Tensor, targets: Tensor, cap: float | None) -> Tensor:
    return nll_sum_unchecked(softcapped(head(hidden), cap), targets)


def batch_lengths(batch: ChatBatch) -> list[int]:
    """Real tokens per row of a right-padded batch (read from the host when the batch is there)."""
    return mask_lengths(batch.attention_mask)


def _flat_real(lengths: list[int], width: int) -> Int[Tensor, " total"]:
    """Positions of the real tokens in a right-padded ``[len(lengths), width]`` batch, flattened (on the host)."""
    return torch.cat([torch.arange(n) + row * width for row, n in enumerate(lengths)])


def _check_right_padded(attention_mask: Tensor) -> None:
    if not bool((attention_mask[:, :-1] >= attention_mask[:, 1:]).all()):
        raise ValueError("the fast path needs right-padded batches (real tokens first in every row)")


_RUNNERS: weakref.WeakKeyDictionary[Any, Runner] = weakref.WeakKeyDictionary()


def runner_for(model: Any) -> Runner:
    """The one :class:`Runner` of ``model`` (created on first use, kept as long as the model lives).

    The table holds models weakly and each runner holds its model weakly too, so a model nothing
    else holds is freed with its runner (a runner holding its model would keep every model alive).
    """
    runner = _RUNNERS.get(model)
    if runner is None:
        runner = _RUNNERS[model] = Runner(model)
    return runner


def no_grad_unless(training: bool) -> Any:
    return nullcontext() if training else torch.no_grad()
