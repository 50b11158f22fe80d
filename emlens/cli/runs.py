"""What the ``train``, ``drift`` and ``measure`` commands need beyond :mod:`emlens.training`: where their data and
runs come from, checked against their flags (errors name the flags) before any model loads."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from emlens.data import TokenDataset
from emlens.interventions import Intervention, RankOneAdapter, SteeringVector
from emlens.training import TrainingResult
from emlens.validation import ConfigError


def data_source(source: str, split: str = "train") -> str:
    """A built-in set named without a split means its ``split`` (training: ``train``); files and ``kl:`` sets are taken whole."""
    from emlens.data.studies import BUILTIN_DIR, SPLITS

    if str(source).rpartition(":")[2] in SPLITS or str(source).startswith("kl:"):
        return str(source)
    if not Path(source).exists() and (BUILTIN_DIR / f"{source}.jsonl").exists() and str(source) != "web_text":
        return f"{source}:{split}"
    return str(source)


def load_trained(path: str | Path, device: str | torch.device = "cpu") -> TrainingResult | Intervention:
    """A run directory as its :class:`TrainingResult` (trajectory included), or a saved intervention file."""
    return TrainingResult.load(path) if Path(path).is_dir() else Intervention.load(path, device=device)


def tokenized(model: Any, source: str, max_length: int, limit: int | None = None) -> TokenDataset:
    """Conversations of ``source`` (a built-in set: its train split, :func:`data_source`) as ``model``'s tokens."""
    return TokenDataset.from_conversations(model.tokenizer, data_source(source), max_length, limit)


def resume_point(resume: str | Path | None, out: str | Path) -> tuple[TrainingResult | None, Intervention | None]:
    """What continuing ``resume`` into ``out`` starts from: ``(finished run, None)`` or ``(None, interrupted run's intervention)``.

    An interrupted run (a checkpoint, no final result) continues exactly, in place only; a finished run is
    continued as a new phase (e.g. a narrow run continued without KL). ``(None, None)`` without ``resume``.
    """
    if resume is None:
        return None, None
    resume = Path(resume)
    if (resume / "checkpoint" / "state.pt").exists() and not (resume / "losses.json").exists():
        if resume.resolve() != Path(out).resolve():
            raise ConfigError(f"--resume {resume} is an interrupted run: continue it in place with --out {resume}")
        return None, Intervention.load(resume / "checkpoint" / "intervention.safetensors")
    return TrainingResult.load(resume), None


def kl_set(data: str, kl_data: str | None, kl_weight: float) -> str | None:
    """The KL conversations of a run: ``kl_data``, else with ``kl_weight`` > 0 the study's KL set for a built-in ``data``.

    A ``kl_data`` that ``kl_weight`` = 0 leaves unused is warned about; ``None`` when there is no KL term."""
    from emlens.data.studies import default_kl_for

    if kl_weight > 0 and not kl_data:
        kl_data = default_kl_for(data)
        if kl_data is None:
            raise ConfigError("--kl-weight > 0 needs --kl-data (conversations from other domains, e.g. kl:medical)")
    if kl_data and kl_weight == 0:
        warnings.warn("--kl-data is not used because --kl-weight is 0; pass --kl-weight > 0 to add the KL term", UserWarning, stacklevel=2)
    return kl_data


# "vector" is the study config's name for the steering vector (kinds = ["vector", "adapter"], stage train/vector/...)
INTERVENTION_KINDS: dict[str, type[SteeringVector] | type[RankOneAdapter]] = {
    "steering": SteeringVector,
    "vector": SteeringVector,
    "adapter": RankOneAdapter,
}


def continuation(
    resume: str | Path | None,
    out: Path,
    max_steps: int | None = None,
    kind: str | None = None,
    layer: int | None = None,
    ignored: Sequence[str] = (),
) -> tuple[TrainingResult | None, Intervention | None]:
    """:func:`resume_point`, checked against the new run's settings before any model loads.

    ``kind`` (a key of :data:`INTERVENTION_KINDS`) and ``layer`` must match the resumed run; ``ignored`` names
    settings given that a resumed run keeps its own (warned about); continuing a finished run in place is warned
    about, since its result files are replaced (``max_steps``: the new phase's steps, for the message)."""
    previous, interrupted = resume_point(resume, out)
    resumed = interrupted if previous is None else previous.intervention
    if resumed is not None:
        if kind is not None and resumed.kind != INTERVENTION_KINDS[kind].kind:
            raise ConfigError(
                f"--kind {kind} does not match the run in --resume {resume} "
                f"(it trains a {type(resumed).__name__}); drop --kind or start a new run"
            )
        trained = getattr(resumed, "layer", None)
        if layer is not None and trained is not None and layer != trained:
            raise ConfigError(
                f"--layer {layer} does not match the run in --resume {resume} (layer {trained}); drop --layer or start a new run"
            )
        if ignored:
            warnings.warn(f"{' and '.join(ignored)} are ignored with --resume: the resumed run keeps its own", UserWarning, stacklevel=2)
    if previous is not None and resume is not None and Path(out).resolve() == Path(resume).resolve():
        warnings.warn(
            f"--resume {resume} is a finished run: continuing it in place trains a second phase of "
            f"{max_steps or 'one pass of'} steps after its step {previous.losses[-1]['step'] if previous.losses else 0}, and its "
            "intervention.safetensors and losses.json are replaced by the continued run's (the losses keep both phases); "
            "to keep the first phase's files, continue into a new --out",
            UserWarning,
            stacklevel=2,
        )
    return previous, interrupted


def intervention_to_train(
    model: Any,
    resumed: Intervention | None = None,
    kind: str | None = None,
    layer: int | None = None,
    hook: str | None = None,
    alpha: float | None = None,
    seed: int = 0,
) -> Intervention:
    """``resumed``, or a fresh intervention (``kind`` defaults to a steering vector on ``resid_post``, ``layer`` to the middle one)."""
    if layer is not None and layer >= model.cfg.n_layers:
        n = model.cfg.n_layers
        raise ConfigError(f"--layer must be in [0, {n - 1}] for this model ({n} layers), got {layer}")
    if resumed is not None:
        return resumed
    scale = {} if alpha is None else {"alpha": alpha}
    if INTERVENTION_KINDS[kind or "steering"] is SteeringVector:
        return SteeringVector.for_model(model, layer, hook=hook or "resid_post", **scale)
    return RankOneAdapter.for_model(model, layer, seed=seed, **scale)
