"""Training interventions by gradient descent: SFT loss on assistant tokens, optional KL to the base model.

``L = L_SFT + λ · KL(p_base ‖ p_steered)``, with the KL averaged over the real
(non-padding) tokens of alternative-domain conversations and ``p_base`` computed by the
same model with the intervention switched off (no second model copy).
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from emlens.data import ChatBatch, TokenDataset
from emlens.interventions import Intervention, SteeringVector
from emlens.packed import fast_layers, run_packed, supports_packing
from emlens.prefix_cache import (
    ExampleResiduals,
    PrefixCache,
    hidden_from_layer,
    logits_at,
    plain_layers,
)


def seed_everything(seed: int) -> None:
    """Seed Python, and torch (CPU and CUDA) RNGs."""
    random.seed(seed)
    torch.manual_seed(seed)


def model_device(model: Any) -> torch.device:
    return next(model.parameters()).device


def forward_logits(model: Any, batch: ChatBatch) -> Float[Tensor, "batch seq vocab"]:
    """Logits for a padded batch (attention mask passed so padding is never attended to)."""
    return model(batch.input_ids, attention_mask=batch.attention_mask)


def per_token_sft_losses(
    logits: Float[Tensor, "batch seq vocab"], batch: ChatBatch
) -> tuple[Float[Tensor, "batch seq_minus_1"], Tensor]:
    """Next-token cross-entropy at every position and the mask of positions that count.

    Position ``t`` scores the prediction of token ``t+1``; it counts when token ``t+1`` is
    an assistant token (``loss_mask``).
    """
    targets = batch.input_ids[:, 1:]
    losses = F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none"
    ).view_as(targets)
    return losses, batch.scored


def sft_loss(logits: Float[Tensor, "batch seq vocab"], batch: ChatBatch) -> Float[Tensor, ""]:
    """Mean cross-entropy over assistant tokens of the batch."""
    losses, mask = per_token_sft_losses(logits, batch)
    return losses.masked_fill(~mask, 0).sum() / mask.sum().clamp(min=1)


def kl_per_token(
    base_logits: Float[Tensor, "batch seq vocab"], steered_logits: Float[Tensor, "batch seq vocab"]
) -> Float[Tensor, "batch seq"]:
    """``KL(p_base ‖ p_steered)`` at each position, summed over the vocabulary (not divided by it)."""
    base_logp = F.log_softmax(base_logits.float(), dim=-1)
    steered_logp = F.log_softmax(steered_logits.float(), dim=-1)
    return (base_logp.exp() * (base_logp - steered_logp)).sum(-1)


def masked_mean(values: Float[Tensor, "batch seq"], mask: Tensor) -> Float[Tensor, ""]:
    """Mean of ``values`` where ``mask`` is set (values elsewhere, even non-finite ones, are ignored)."""
    mask = mask.bool()
    return values.masked_fill(~mask, 0).sum() / mask.sum().clamp(min=1)


def kl_to_base(model: Any, intervention: Intervention, batch: ChatBatch) -> Float[Tensor, ""]:
    """Mean per-token ``KL(p_base ‖ p_steered)`` over real tokens; ``intervention`` must be applied."""
    with torch.no_grad(), intervention.disabled():
        base = forward_logits(model, batch)
    steered = forward_logits(model, batch)
    return masked_mean(kl_per_token(base, steered), batch.attention_mask)


@torch.no_grad()
def evaluate_loss(
    model: Any,
    dataset: TokenDataset,
    intervention: Intervention | None = None,
    batch_size: int = 8,
    progress: bool = False,
    prefix: PrefixCache | None = None,
) -> float:
    """Token-weighted mean SFT loss of ``dataset`` with ``intervention`` applied (or the base model).

    With a :class:`~emlens.prefix_cache.PrefixCache` (whose layer must not exceed the
    intervention's), blocks below its layer are computed once and reused across calls.
    """
    device = model_device(model)
    if prefix is not None and intervention is not None and intervention.layer < prefix.layer:
        raise ValueError(f"prefix cache starts at block {prefix.layer}, above the intervention's layer {intervention.layer}")
    total, count = 0.0, 0
    batches = dataset.batches(batch_size)
    if progress:
        batches = tqdm(batches, total=math.ceil(len(dataset) / batch_size), desc="eval loss", leave=False)

    def run() -> None:
        nonlocal total, count
        for batch in batches:
            batch = batch.to(device)
            logits = prefix.logits(batch) if prefix is not None else forward_logits(model, batch)
            losses, mask = per_token_sft_losses(logits, batch)
            total += float(losses[mask].sum())
            count += int(mask.sum())

    if intervention is None:
        run()
    else:
        with intervention.applied(model):
            run()
    return total / max(count, 1)


@dataclass
class TrainConfig:
    """Training settings; defaults follow the paper's steering-vector runs (per-token KL weight)."""

    lr: float = 1e-4
    epochs: float = 1.0
    max_steps: int | None = None
    batch_size: int = 2
    grad_accum: int = 8
    warmup_steps: int = 5
    weight_decay: float = 0.0
    max_length: int = 256
    kl_weight: float = 0.0
    kl_batch_size: int = 8
    checkpoint_every: int = 5
    seed: int = 0
    progress: bool = True
    cache_prefix: bool = True  # compute blocks below the intervention once per example (see TrainingCaches to share across runs)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "TrainConfig":
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
    losses: list[dict[str, float]] = field(default_factory=list)
    trajectory: list[tuple[int, dict[str, Tensor]]] = field(default_factory=list)

    def trajectory_interventions(self) -> list[Intervention]:
        """Each checkpoint as an intervention of the same kind."""
        meta = self.intervention.metadata()
        return [type(self.intervention).from_state(meta, state) for _, state in self.trajectory]

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
    def load(cls, directory: str | Path) -> "TrainingResult":
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
    """One vector per intervention: the effective vector for steering, concatenated factors otherwise."""
    effective = getattr(intervention, "effective", None)
    if effective is not None:
        return effective.detach().float().cpu()
    return torch.cat([p.detach().float().cpu().flatten() for p in intervention.parameters()])


def _cycle(dataset: TokenDataset, batch_size: int, seed: int) -> Iterator[tuple[list[int], ChatBatch]]:
    epoch = 0
    while True:
        yield from dataset.indexed_batches(batch_size, shuffle=True, seed=seed + epoch)
        epoch += 1


def _lr_lambda(warmup: int, total: int):
    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(warmup, 1)
        return max(0.0, (total - step) / max(total - warmup, 1))

    return schedule


def steers_residual_after_block(model: Any, intervention: Intervention) -> bool:
    """Whether ``intervention`` only adds one vector to the residual stream after its block, at every position.

    Then the blocks up to and including its block never depend on it: the residual after the
    block is cached and the vector added directly, without running any hooked block.
    """
    return (
        isinstance(intervention, SteeringVector)
        and intervention.positions == "all"
        and intervention.hook in (f"blocks.{intervention.layer}.hook_resid_post", f"blocks.{intervention.layer}.hook_mlp_out")
        and hasattr(model, "original_model")
    )


def cache_layer(model: Any, intervention: Intervention) -> int:
    """The block whose input a training cache holds: the first block the intervention can change."""
    return intervention.layer + 1 if steers_residual_after_block(model, intervention) else intervention.layer


@dataclass
class TrainingCaches:
    """Per-example residual caches for :func:`train`, built once and reusable across runs on the same data.

    ``sft`` holds the training set's residuals entering the first block the intervention can
    change; ``kl`` the same for the KL set plus the base model's final hidden states. Runs that
    share the data, model and intervention layer (other seeds, other KL weights, a continuation)
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
    ) -> "TrainingCaches":
        """Caches for training ``intervention`` (its kind and layer) on ``dataset`` (and ``kl_dataset``)."""
        if not hasattr(model, "original_model"):
            raise TypeError("training caches need a TransformerLens bridge (a model with .original_model)")
        layer = cache_layer(model, intervention)
        if layer == 0:
            raise ValueError("nothing lies below an intervention at block 0 to cache")
        sft = ExampleResiduals(model, dataset, layer, batch_size, device, progress)
        kl = ExampleResiduals(model, kl_dataset, layer, batch_size, device, progress, base_hidden=True) if kl_dataset is not None else None
        return cls(sft, kl)

    @classmethod
    def for_run(
        cls, model: Any, intervention: Intervention, dataset: TokenDataset, kl_dataset: TokenDataset | None, config: TrainConfig
    ) -> "TrainingCaches | None":
        """The caches a run with ``config`` builds for itself (None with ``cache_prefix`` off or nothing below)."""
        if not (config.cache_prefix and hasattr(model, "original_model") and cache_layer(model, intervention) > 0):
            return None
        return cls.build(model, intervention, dataset, kl_dataset, max(config.batch_size, config.kl_batch_size), progress=config.progress)

    def check(self, model: Any, intervention: Intervention, dataset: TokenDataset, kl_dataset: TokenDataset | None) -> None:
        """Raise if these caches do not fit this run's intervention layer and data."""
        layer = cache_layer(model, intervention)
        self.sft.check(dataset, layer)
        if kl_dataset is not None:
            if self.kl is None:
                raise ValueError("training caches hold no KL-set cache, but this run has a KL term")
            self.kl.check(kl_dataset, layer, base_hidden=True)


def train(
    model: Any,
    intervention: Intervention,
    dataset: TokenDataset,
    config: TrainConfig | None = None,
    kl_dataset: TokenDataset | None = None,
    resume_from: TrainingResult | None = None,
    caches: TrainingCaches | None = None,
) -> TrainingResult:
    """Train ``intervention`` in place on ``dataset`` (assistant-token SFT loss).

    With ``config.kl_weight > 0`` each optimiser step also adds ``λ · KL(p_base ‖ p_steered)``
    on a batch of ``kl_dataset``. ``resume_from`` continues an earlier result's losses and
    trajectory (e.g. a narrow run continued without KL to watch it drift). ``caches``
    (:class:`TrainingCaches`) reuses residual caches built earlier; without them, and with
    ``config.cache_prefix``, they are built at the start of the run.
    """
    config = config or TrainConfig()
    if config.kl_weight > 0 and kl_dataset is None:
        raise ValueError("kl_weight > 0 needs a kl_dataset of alternative-domain conversations")
    seed_everything(config.seed)
    device = model_device(model)
    intervention.to(device).train()
    params = [p for p in intervention.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(len(dataset) / (config.batch_size * config.grad_accum))
    total_steps = config.max_steps or max(1, math.ceil(steps_per_epoch * config.epochs))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(config.warmup_steps, total_steps))

    result = TrainingResult(intervention, config)
    start_step = 0
    if resume_from is not None:
        result.losses = list(resume_from.losses)
        result.trajectory = list(resume_from.trajectory)
        start_step = result.losses[-1]["step"] if result.losses else 0
    if not result.trajectory:
        result.trajectory.append((start_step, _snapshot(intervention)))

    use_kl = kl_dataset is not None and config.kl_weight > 0
    if caches is not None:
        caches.check(model, intervention, dataset, kl_dataset if use_kl else None)
    else:
        caches = TrainingCaches.for_run(model, intervention, dataset, kl_dataset if use_kl else None, config)
    layer = cache_layer(model, intervention)
    direct = caches is not None and steers_residual_after_block(model, intervention)
    hf = getattr(model, "original_model", None)
    packed = direct and supports_packing(hf)
    upper = fast_layers(model, plain_layers(model)[layer:]) if packed else None

    def logits_for(idx: list[int], batch: ChatBatch, cache: ExampleResiduals | None, rows: Tensor) -> Tensor:
        """Logits at the positions ``rows`` ([batch, seq] bool) only: [n_rows, vocab], in row-major order."""
        if cache is None:
            return forward_logits(model, batch)[rows]
        if packed:  # residual after the block + vector, upper blocks on the packed real tokens
            resid, packing = cache.packed(idx, device)
            hidden = run_packed(hf, upper, resid + intervention.effective.to(resid.dtype), packing)
            return logits_at(model, hidden[rows[batch.attention_mask.bool()].to(hidden.device)])
        resid = cache.batch(idx, batch.input_ids.shape[1]).to(device)
        if direct:
            hidden = hidden_from_layer(model, resid + intervention.effective.to(resid.dtype), batch.attention_mask, layer, hooked_blocks=0)
        else:
            hidden = hidden_from_layer(model, resid, batch.attention_mask, layer)
        return logits_at(model, hidden[rows.to(hidden.device)])

    sft_cache = caches.sft if caches is not None else None
    kl_cache = caches.kl if caches is not None and use_kl else None
    sft_batches = _cycle(dataset, config.batch_size, config.seed)
    kl_batches = _cycle(kl_dataset, config.kl_batch_size, config.seed + 1) if use_kl else None
    bar = tqdm(range(total_steps), desc=f"train {intervention.kind}", disable=not config.progress)
    with intervention.applied(model):
        for step in bar:
            optimizer.zero_grad(set_to_none=True)
            micro = [(idx, b.to(device)) for idx, b in (next(sft_batches) for _ in range(config.grad_accum))]
            n_tokens = sum(b.n_loss_tokens for _, b in micro)
            sft_total = 0.0
            for idx, batch in micro:
                # position t predicts token t+1; score it where t+1 is a real assistant token
                logits = logits_for(idx, batch, sft_cache, batch.scored_positions)
                # token-weighted over the whole accumulated batch, so micro-batch sizes don't bias it
                targets = batch.scored_targets.to(logits.device)
                loss = F.cross_entropy(logits.float(), targets, reduction="sum") / max(n_tokens, 1)
                loss.backward()
                sft_total += float(loss.detach())
            record = {"step": start_step + step + 1, "sft": sft_total}
            if kl_batches is not None:
                idx, kl_batch = next(kl_batches)
                kl_batch = kl_batch.to(device)
                real = kl_batch.attention_mask.bool()
                with torch.no_grad(), intervention.disabled():
                    base = logits_at(model, kl_cache.base(idx).to(device)) if kl_cache is not None else logits_for(idx, kl_batch, None, real)
                steered = logits_for(idx, kl_batch, kl_cache, real)
                kl = kl_per_token(base, steered).mean()  # mean over real tokens only
                (config.kl_weight * kl).backward()
                record["kl"] = float(kl.detach())
            optimizer.step()
            scheduler.step()
            record["norm"] = intervention.norm
            record["lr"] = scheduler.get_last_lr()[0]
            result.losses.append(record)
            bar.set_postfix({k: f"{v:.4g}" for k, v in record.items() if k in ("sft", "kl", "norm")})
            if (step + 1) % config.checkpoint_every == 0 or step + 1 == total_steps:
                result.trajectory.append((start_step + step + 1, _snapshot(intervention)))
    intervention.eval()
    return result


def _snapshot(intervention: Intervention) -> dict[str, Tensor]:
    return {k: v.detach().cpu().clone() for k, v in intervention.state_dict().items()}
