"""Training interventions by gradient descent: SFT loss on assistant tokens, optional KL to the base model.

``L = L_SFT + λ · KL(p_base ‖ p_steered)``, with the KL averaged over the real
(non-padding) tokens of alternative-domain conversations and ``p_base`` computed by the
same model with the intervention switched off (no second model copy).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, no_type_check

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from emlens.data import ChatBatch, TokenDataset
from emlens.interventions import Intervention
from emlens.runner import ExampleResiduals, Plan, ResidualStore, loss_sweep, runner_for
from emlens.runner.caches import CACHE_TOKENS_PER_FORWARD
from emlens.runner.transfer import to_device
from emlens.scoring import kl_per_token, nll_sum
from emlens.validation import ConfigError


def seed_everything(seed: int) -> None:
    """Seed Python, and torch (CPU and CUDA) RNGs."""
    random.seed(seed)
    torch.manual_seed(seed)


def model_device(model: Any) -> torch.device:
    return next(model.parameters()).device


def evaluate_loss(
    model: Any,
    dataset: TokenDataset,
    intervention: Intervention | None = None,
    batch_size: int = 8,
    progress: bool = False,
    cache_prefix: bool = True,
) -> float:
    """Token-weighted mean SFT loss of ``dataset``'s assistant tokens with ``intervention`` on (or the base model).

    The runner picks the path (``runner_for(model).last_plan`` says which ran and why).
    """
    return loss_sweep(model, dataset, [intervention], batch_size, cache_prefix, progress, desc="eval loss")[0]


@torch.no_grad()
def kl_to_base(model: Any, intervention: Intervention, batch: ChatBatch) -> float:
    """Mean per-token ``KL(p_base ‖ p_steered)`` over the real tokens of one batch."""
    runner = runner_for(model)
    plan = runner.plan(intervention)
    real = batch.attention_mask.bool()
    base = runner.logits(batch, real, None, plan)
    with runner.applied(intervention, plan):
        steered = runner.logits(batch, real, intervention, plan)
    return float(_kl_term(base, steered))


@no_type_check  # __post_init__ checks every field with a ConfigError naming it; a run-time type checker must not pre-empt it
@dataclass
class TrainConfig:
    """Training settings; defaults follow the paper's steering-vector runs (per-token KL weight)."""

    lr: float | int = 1e-4
    epochs: float | int = 1.0
    max_steps: int | None = None
    batch_size: int = 2
    grad_accum: int = 8
    warmup_steps: int = 5
    weight_decay: float | int = 0.0
    max_length: int = 256  # examples longer than this (in tokens) are cut by train(), with a TruncationWarning
    kl_weight: float | int = 0.0
    kl_batch_size: int = 8
    checkpoint_every: int = 5
    seed: int = 0
    progress: bool = True
    cache_prefix: bool = True  # compute blocks below the intervention once per example (see TrainingCaches to share across runs)

    def __post_init__(self) -> None:
        from emlens.validation import validate_train_config

        validate_train_config(self)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> TrainConfig:
        data = json.loads(text)
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown TrainConfig fields: {sorted(unknown)}")
        return cls(**data)


@dataclass
class TrainingResult:
    """What a run produced: the trained intervention, per-step losses and the checkpoint trajectory."""

    intervention: Intervention
    config: TrainConfig
    losses: list[dict[str, float | int]] = field(default_factory=list)
    trajectory: list[tuple[int, dict[str, Tensor]]] = field(default_factory=list)
    plan: str = ""  # which execution path trained it, and why

    def trajectory_interventions(self) -> list[Intervention]:
        """Each checkpoint as an intervention of the same kind."""
        meta = self.intervention.metadata()
        return [self.intervention.from_state(meta, state) for _, state in self.trajectory]

    def trajectory_matrix(self) -> Float[Tensor, "n_checkpoints n_params"]:
        """Checkpoints stacked as rows of flattened parameters (effective vectors for steering)."""
        return torch.stack([flat_parameters(i) for i in self.trajectory_interventions()])

    def save(self, directory: str | Path) -> Path:
        """Write the intervention, config, losses and trajectory to ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.intervention.save(directory / "intervention.safetensors")
        (directory / "config.json").write_text(self.config.to_json())
        (directory / "losses.json").write_text(json.dumps(self.losses))
        torch.save([(s, st) for s, st in self.trajectory], directory / "trajectory.pt")
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> TrainingResult:
        """Read a result written by :meth:`save` (e.g. to continue training with ``resume_from``)."""
        directory = Path(directory)
        for name in ("intervention.safetensors", "config.json", "losses.json", "trajectory.pt"):
            if not (directory / name).exists():
                raise FileNotFoundError(f"{directory} is not a saved training run: {name} is missing")
        return cls(
            Intervention.load(directory / "intervention.safetensors"),
            TrainConfig.from_json((directory / "config.json").read_text()),
            json.loads((directory / "losses.json").read_text()),
            [(int(s), st) for s, st in torch.load(directory / "trajectory.pt")],
        )


def flat_parameters(intervention: Intervention) -> Float[Tensor, " n"]:
    """One vector per intervention (its own :meth:`~emlens.interventions.Intervention.flatten`)."""
    return intervention.flatten()


class _BatchCycle:
    """Shuffled batches, epoch after epoch (epoch e shuffled with ``seed + e``); its position can be saved and restored."""

    def __init__(self, dataset: TokenDataset, batch_size: int, seed: int, epoch: int = 0, offset: int = 0):
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.epoch, self.offset = epoch, offset
        self._batches: list[tuple[list[int], ChatBatch]] | None = None

    def _epoch_batches(self) -> list[tuple[list[int], ChatBatch]]:
        if self._batches is None:
            self._batches = list(self.dataset.indexed_batches(self.batch_size, shuffle=True, seed=self.seed + self.epoch))
        return self._batches

    def __next__(self) -> tuple[list[int], ChatBatch]:
        if self.offset >= len(self._epoch_batches()):
            self.epoch, self.offset, self._batches = self.epoch + 1, 0, None
            return next(self)
        self.offset += 1
        return self._epoch_batches()[self.offset - 1]

    def step(self, n: int) -> list[tuple[list[int], ChatBatch]]:
        """The next ``n`` batches of one optimiser step, fewer where the epoch ends first.

        An epoch's last step takes only what is left of it (as a data loader that keeps its last
        batch does), so one epoch trains every row exactly once.
        """
        out = [next(self)]
        while len(out) < n and self.offset < len(self._epoch_batches()):
            out.append(next(self))
        return out

    def position(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset}


def _lr_lambda(warmup: int, total: int):
    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(warmup, 1)
        return max(0.0, (total - step) / max(total - warmup, 1))

    return schedule


@dataclass
class TrainingCaches:
    """Per-example residual caches for :func:`train`, built once and reusable across runs on the same data.

    ``sft`` holds the training set's residuals entering the first block the intervention can
    change; ``kl`` the same for the KL set plus the base model's final hidden states. Runs that
    share the data, model and intervention site (other seeds, other KL weights, a continuation)
    can pass the same caches and skip all work below the intervention.
    """

    sft: ExampleResiduals
    kl: ExampleResiduals | None = None

    @classmethod
    def build(
        cls,
        model: Any,
        intervention: Intervention,
        dataset: TokenDataset,
        kl_dataset: TokenDataset | None = None,
        batch_size: int = 8,
        device: str | torch.device | None = None,
        progress: bool = True,
        tokens_per_forward: int | None = CACHE_TOKENS_PER_FORWARD,
        store: ResidualStore | None = None,
    ) -> TrainingCaches:
        """Caches for training ``intervention`` (its kind and site) on ``dataset`` (and ``kl_dataset``).

        Examples run up to ``tokens_per_forward`` tokens at a time (None: ``batch_size`` examples at a time).
        With ``store`` (a :class:`~emlens.runner.ResidualStore` of the same model), examples an earlier
        cache computed at the same block are taken from it, not run again (a mixing set repeats the
        target rows).
        """
        plan = runner_for(model).plan(intervention)
        if not plan.fast:
            raise ValueError(f"training caches need the fast path, but the runner plans the {plan.describe()}")
        store = store if store is not None else ResidualStore()  # the SFT and KL sets share work too
        sft = ExampleResiduals(model, dataset, plan.cut, batch_size, device, progress, tokens_per_forward=tokens_per_forward, store=store)
        kl = None
        if kl_dataset is not None:
            kl = ExampleResiduals(
                model,
                kl_dataset,
                plan.cut,
                batch_size,
                device,
                progress,
                base_hidden=True,
                tokens_per_forward=tokens_per_forward,
                store=store,
            )
        return cls(sft, kl)

    @classmethod
    def for_run(
        cls, model: Any, intervention: Intervention, dataset: TokenDataset, kl_dataset: TokenDataset | None, config: TrainConfig
    ) -> TrainingCaches | None:
        """The caches a run with ``config`` builds for itself (None when the runner plans the hooked path)."""
        if not runner_for(model).plan(intervention, config.cache_prefix).fast:
            return None
        dataset = dataset.truncated(config.max_length, "training set")  # as train() will see it
        kl_dataset = kl_dataset.truncated(config.max_length, "KL set") if kl_dataset is not None else None
        return cls.build(model, intervention, dataset, kl_dataset, progress=config.progress)

    def check(self, plan: Plan, dataset: TokenDataset, kl_dataset: TokenDataset | None, model: Any | None = None) -> None:
        """Raise if these caches do not fit this run's plan and data (and, given ``model``, were built by another model)."""
        self.sft.check(dataset, plan.cut, model=model)
        if kl_dataset is not None:
            if self.kl is None:
                raise ValueError("training caches hold no KL-set cache, but this run has a KL term")
            self.kl.check(kl_dataset, plan.cut, base_hidden=True, model=model)


def train(
    model: Any,
    intervention: Intervention,
    dataset: TokenDataset,
    config: TrainConfig | None = None,
    kl_dataset: TokenDataset | None = None,
    resume_from: TrainingResult | None = None,
    caches: TrainingCaches | None = None,
    run_dir: str | Path | None = None,
    resume: bool = False,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> TrainingResult:
    """Train ``intervention`` in place on ``dataset`` (assistant-token SFT loss).

    With ``config.kl_weight > 0`` each optimiser step also adds ``λ · KL(p_base ‖ p_steered)``
    on a batch of ``kl_dataset``. ``resume_from`` continues an earlier result's losses and
    trajectory (e.g. a narrow run continued without KL to watch it drift). The runner picks
    the path (``result.plan``); on the fast path ``caches`` (:class:`TrainingCaches`) reuses
    residual caches built earlier, and without them they are built at the start of the run.

    With ``run_dir``, every checkpoint (intervention, optimizer, scheduler, RNG states, data
    position, losses and trajectory so far) is written there atomically, so Ctrl-C or a crash
    loses nothing before the last checkpoint; ``resume=True`` continues such a run exactly
    (on CPU, 3 + 3 steps equal 6 steps bit for bit) and refuses a different intervention kind,
    model, data or config. A non-finite loss, gradient or parameter stops training with a
    :class:`NonFiniteError` naming the step; the intervention is put back to its last finite
    values and the last finite checkpoint stays on disk. ``on_step(step, record)`` is called
    after every step.
    """
    config = config or TrainConfig()
    budget = train_tokens_per_forward()  # the fused forward's size, read (and checked) before any work
    if config.kl_weight > 0 and kl_dataset is None:
        raise ValueError("kl_weight > 0 needs a kl_dataset of alternative-domain conversations")
    # config.max_length acts here: longer examples are cut (and reported, as the data readers report them)
    dataset = dataset.truncated(config.max_length, "training set")
    if kl_dataset is not None:
        kl_dataset = kl_dataset.truncated(config.max_length, "KL set")
    runner = runner_for(model)
    plan = runner.plan(intervention, config.cache_prefix)
    checkpoints = None
    if run_dir is not None:
        from emlens.checkpoints import RunCheckpoints

        # conflicts are found here, before any work: another run's checkpoint, or one without resume=True
        checkpoints = RunCheckpoints(run_dir, config, intervention, model, dataset, kl_dataset if config.kl_weight > 0 else None, resume)
    try:
        seed_everything(config.seed)
        device = runner.device
        intervention.to(device).train()
        params = [p for p in intervention.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        steps_per_epoch = math.ceil(len(dataset) / (config.batch_size * config.grad_accum))
        total_steps = config.max_steps or max(1, math.ceil(steps_per_epoch * config.epochs))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(config.warmup_steps, total_steps))

        result = TrainingResult(intervention, config, plan=plan.describe())
        start_step = 0
        if resume_from is not None:
            result.losses = list(resume_from.losses)
            result.trajectory = list(resume_from.trajectory)
            start_step = int(result.losses[-1]["step"]) if result.losses else 0
        if not result.trajectory:
            result.trajectory.append((start_step, _snapshot(intervention)))

        use_kl = kl_dataset is not None and config.kl_weight > 0
        if not plan.fast:
            caches = None
        elif caches is not None:
            caches.check(plan, dataset, kl_dataset if use_kl else None, model)
        else:
            caches = TrainingCaches.build(model, intervention, dataset, kl_dataset if use_kl else None, progress=config.progress)
        sft_cache = caches.sft if caches is not None else None
        kl_cache = caches.kl if caches is not None and use_kl else None

        sft_batches = _BatchCycle(dataset, config.batch_size, config.seed)
        kl_batches = _BatchCycle(kl_dataset, config.kl_batch_size, config.seed + 1) if use_kl and kl_dataset is not None else None
        first = 0
        if checkpoints is not None:
            saved = checkpoints.restore(intervention, optimizer, scheduler, sft_batches, kl_batches)
            if saved is not None:
                first = saved.step
                start_step = saved.start_step  # the checkpoint counts within its phase; the labels continue the earlier phases
                result.losses, result.trajectory = saved.losses, saved.trajectory
        # advanced by hand: the last step's line is drawn once, by close() (a final refresh and close() would print it twice in a log)
        bar = tqdm(desc=f"train {intervention.kind}", disable=not config.progress, initial=first, total=total_steps)
        # Each step reads the device twice (its losses and gradients' finiteness before the update, the
        # parameters' finiteness and norm after it) and never waits on the GPU anywhere else.
        last_good = _device_snapshot(intervention)
        with runner.applied(intervention, plan):
            for step in range(first, total_steps):
                number = start_step + step + 1
                optimizer.zero_grad(set_to_none=True)
                micro = sft_batches.step(config.grad_accum)  # host batches: the runner moves what it needs
                # token-weighted over the whole accumulated batch, so micro-batch sizes don't bias it
                n_tokens = sum(int(b.scored.sum()) for _, b in micro)
                kl_item = next(kl_batches) if kl_batches is not None else None
                if sft_cache is not None:  # fast path: the step's micro-batches (and KL batch) in as few forwards as fit
                    values = _fused_step(
                        runner, plan, intervention, micro, n_tokens, sft_cache, kl_item, kl_cache, config.kl_weight, budget
                    )
                else:
                    values = _hooked_step(runner, plan, intervention, micro, n_tokens, kl_item, config.kl_weight)
                record: dict[str, float | int] = {"step": number, **_finite_step(intervention, values, number, last_good, checkpoints)}
                lr = float(scheduler.get_last_lr()[0])  # the rate this step's update uses (step() below moves to the next one)
                optimizer.step()
                scheduler.step()
                record["norm"] = _finite_params(intervention, optimizer, number, last_good, checkpoints)
                last_good = _device_snapshot(intervention)
                record["lr"] = lr
                result.losses.append(record)
                bar.set_postfix({k: f"{v:.4g}" for k, v in record.items() if k in ("sft", "kl", "norm")}, refresh=False)
                if step + 1 < total_steps:
                    bar.update(1)
                else:
                    bar.n = total_steps
                if (step + 1) % config.checkpoint_every == 0 or step + 1 == total_steps:
                    result.trajectory.append((number, _snapshot(intervention)))
                    if checkpoints is not None:
                        checkpoints.write(step + 1, start_step, intervention, optimizer, scheduler, sft_batches, kl_batches, result)
                if on_step is not None:
                    on_step(number, record)
        bar.close()
        intervention.eval()
        return result
    finally:
        if checkpoints is not None:
            checkpoints.close()  # releases the run directory's lock


# A training step's micro-batches (and its KL batch) run fused, as one packed forward of up to this many
# tokens: the same gradient as one forward per micro-batch (the loss is a sum over them), but small
# micro-batches fill a large device (at 14B on an H200, micro-batches of 2 rows use it at a fraction).
# Lower it with EMLENS_TRAIN_TOKENS where activation memory is short; a micro-batch larger than this
# runs alone.
TRAIN_TOKENS_PER_FORWARD = 4096


def train_tokens_per_forward() -> int:
    """The fused forward's token budget: ``EMLENS_TRAIN_TOKENS`` if set, else :data:`TRAIN_TOKENS_PER_FORWARD`."""
    raw = os.environ.get("EMLENS_TRAIN_TOKENS", "")
    if not raw:
        return TRAIN_TOKENS_PER_FORWARD
    if not raw.isdigit() or int(raw) < 1:
        raise ConfigError(f"EMLENS_TRAIN_TOKENS must be a whole number of tokens >= 1, got {raw!r}")
    return int(raw)


StepPart = tuple[str, list[int], ChatBatch]  # ("sft" or "kl", example indices, batch)


def _fuse(items: list[StepPart], budget: int) -> list[list[StepPart]]:
    """Consecutive items grouped into forwards of at most ``budget`` real tokens (an item larger than it alone)."""
    groups: list[list[StepPart]] = []
    size = 0
    for item in items:
        tokens = int(item[2].attention_mask.sum())
        if groups and size + tokens <= budget:
            groups[-1].append(item)
            size += tokens
        else:
            groups.append([item])
            size = tokens
    return groups


def _sft_term(logits: Tensor, batch: ChatBatch, n_tokens: int) -> Tensor:
    """A micro-batch's share of the step's SFT loss: its summed NLL over the whole step's ``n_tokens`` scored tokens."""
    return nll_sum(logits, to_device(batch.scored_targets, logits.device)) / max(n_tokens, 1)


def _kl_term(base: Tensor, steered: Tensor) -> Tensor:
    """``KL(p_base ‖ p_steered)`` of a batch: the mean over its real tokens (the rows given), never over padding."""
    return kl_per_token(base, steered).mean()


def _fused_step(
    runner: Any,
    plan: Plan,
    intervention: Intervention,
    micro: list[tuple[list[int], ChatBatch]],
    n_tokens: int,
    sft_cache: ExampleResiduals,
    kl_item: tuple[list[int], ChatBatch] | None,
    kl_cache: ExampleResiduals | None,
    kl_weight: float,
    budget: int,
) -> dict[str, Tensor]:
    """One step's gradient on the fast path, micro-batches fused into forwards of at most ``budget`` tokens; its losses."""
    device = runner.device
    items: list[StepPart] = [("sft", idx, batch) for idx, batch in micro]
    if kl_item is not None:
        items.append(("kl", *kl_item))
    sft_losses: list[Tensor] = []
    values: dict[str, Tensor] = {}
    for group in _fuse(items, budget):
        parts = []
        for what, idx, batch in group:
            cache = sft_cache if what == "sft" else kl_cache
            assert cache is not None
            rows = batch.scored_positions if what == "sft" else batch.attention_mask.bool()
            parts.append((batch, rows, cache.packed(idx, device)))
        terms = []
        for (what, idx, batch), logits in zip(group, runner.logits_fused(parts, intervention, plan)):
            if what == "sft":
                loss = _sft_term(logits, batch, n_tokens)
                sft_losses.append(loss.detach())
                terms.append(loss)
            else:
                assert kl_cache is not None
                with torch.no_grad(), intervention.disabled():
                    base = runner.unembed(kl_cache.base(idx).to(device))
                kl = _kl_term(base, logits)
                values["kl"] = kl.detach().double()
                terms.append(kl_weight * kl)
        torch.stack([t.to(terms[0].device) for t in terms]).sum().backward()
    return {"sft": _on_one_device(sft_losses).sum(), **values}


def _hooked_step(
    runner: Any,
    plan: Plan,
    intervention: Intervention,
    micro: list[tuple[list[int], ChatBatch]],
    n_tokens: int,
    kl_item: tuple[list[int], ChatBatch] | None,
    kl_weight: float,
) -> dict[str, Tensor]:
    """One step's gradient through the whole model, one forward per micro-batch; its losses."""
    micro_losses = []
    for _, batch in micro:
        logits = runner.logits(batch, batch.scored_positions, intervention, plan)
        loss = _sft_term(logits, batch, n_tokens)
        loss.backward()
        micro_losses.append(loss.detach())
    values = {"sft": _on_one_device(micro_losses).sum()}
    if kl_item is not None:
        _, kl_batch = kl_item
        real = kl_batch.attention_mask.bool()
        with torch.no_grad(), intervention.disabled():
            base = runner.logits(kl_batch, real, intervention, plan)
        steered = runner.logits(kl_batch, real, intervention, plan)
        kl = _kl_term(base, steered)
        (kl_weight * kl).backward()
        values["kl"] = kl.detach().double()
    return values


class NonFiniteError(ValueError):
    """Training produced a NaN or infinite loss, gradient or parameter."""


def _restore(intervention: Intervention, state: dict[str, Tensor]) -> None:
    with torch.no_grad():
        for name, tensor in intervention.state_dict().items():
            tensor.copy_(state[name])


def _stop(intervention: Intervention, what: str, step: int, last_good: dict[str, Tensor], checkpoints: Any) -> None:
    _restore(intervention, last_good)
    kept = (
        f"; the last finite checkpoint is kept in {checkpoints.directory}"
        if checkpoints is not None and checkpoints.has_checkpoint()
        else ""
    )
    raise NonFiniteError(
        f"training stopped at step {step}: {what} is not finite (NaN or inf); lower the learning rate or check the data{kept}"
    )


def _finite_step(
    intervention: Intervention, values: dict[str, Tensor], step: int, last_good: dict[str, Tensor], checkpoints: Any
) -> dict[str, float]:
    """``values`` (the step's losses) as floats, after checking them and every gradient is finite (one device read)."""
    grads = [(name, p.grad) for name, p in intervention.named_parameters() if p.grad is not None]
    flags = [torch.isfinite(g).all() for _, g in grads]
    read = _on_one_device([*values.values(), *flags]).tolist()  # values always holds the SFT loss
    out = dict(zip(values, read[: len(values)]))
    for key, value in out.items():
        if not math.isfinite(value):
            _stop(intervention, f"the {'SFT loss' if key == 'sft' else 'KL term'}", step, last_good, checkpoints)
    for (name, _), ok in zip(grads, read[len(values) :]):
        if not ok:
            _stop(intervention, f"the gradient of {name!r}", step, last_good, checkpoints)
    return out


def _finite_params(intervention: Intervention, optimizer: Any, step: int, last_good: dict[str, Tensor], checkpoints: Any) -> float:
    """The intervention's norm, after checking its parameters, the optimiser's state and the norm are finite (one device read).

    An optimiser state that overflowed (AdamW's second moment at a huge KL weight, say) makes
    every later update zero: the run would finish having trained nothing, so it stops here.
    """
    params = list(intervention.named_parameters())
    states = [
        (name, key, value)
        for name, p in params
        for key, value in optimizer.state.get(p, {}).items()
        if key != "step" and isinstance(value, Tensor) and value.is_floating_point()
    ]
    flags = [torch.isfinite(p.detach()).all() for _, p in params] + [torch.isfinite(v).all() for _, _, v in states]
    read = _on_one_device([*flags, intervention.norm_tensor()]).tolist()
    for (name, _), ok in zip(params, read[: len(params)]):
        if not ok:
            _stop(intervention, f"parameter {name!r} after the optimiser step", step, last_good, checkpoints)
    for (name, key, _), ok in zip(states, read[len(params) : -1]):
        if not ok:
            _stop(
                intervention,
                f"the optimiser's {key!r} for {name!r} (it overflowed, so every later update would be zero: "
                "is the KL weight or the learning rate far too large?)",
                step,
                last_good,
                checkpoints,
            )
    if not math.isfinite(read[-1]):  # finite parameters whose norm overflows (e.g. lr 1e30)
        _stop(intervention, "the intervention's norm after the optimiser step", step, last_good, checkpoints)
    return read[-1]


def _on_one_device(scalars: list[Tensor]) -> Float[Tensor, " n"]:
    """Scalars (from any devices, e.g. a model split over GPUs) as one float64 vector on the first one's device."""
    return torch.stack([t.to(device=scalars[0].device, dtype=torch.float64) for t in scalars])


def _device_snapshot(intervention: Intervention) -> dict[str, Tensor]:
    """A copy of the intervention's state where it lives (to restore after a non-finite step; no host sync)."""
    return {k: v.detach().clone() for k, v in intervention.state_dict().items()}


def _snapshot(intervention: Intervention) -> dict[str, Tensor]:
    return {k: v.detach().cpu().clone() for k, v in intervention.state_dict().items()}
