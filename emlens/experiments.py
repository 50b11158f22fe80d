"""Ready-made pipelines: train a general and a narrow solution, then measure every paper metric."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from emlens.data import TokenDataset, read_texts
from emlens.geometry import cosine_similarity
from emlens.interventions import Intervention, SteeringVector, random_direction_like
from emlens.metrics import drift, efficiency, norm_grid, pretraining_significance, stability
from emlens.plotting import plot_drift, plot_efficiency, plot_pretraining_kl, plot_stability
from emlens.training import TrainConfig, evaluate_loss, train


@dataclass
class ReportSettings:
    """Sizes of a quick reproduction (defaults fit a CPU; raise them on a GPU)."""

    domain_data: str = "medical_harmful"
    kl_data: str = "alt_domain"
    web_text: str = "web_text"
    steps: int = 40
    lr: float = 5e-4
    batch_size: int = 4
    kl_weight: float = 6.6
    kl_batch_size: int = 4
    eval_rows: int = 40
    n_norms: int = 9
    epsilons: tuple[float, ...] = (0.0, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0)
    seeds: tuple[int, ...] = (0, 1, 2)
    n_web_docs: int = 24
    drift_steps: int = 20
    seed: int = 0


def train_general_and_narrow(model: Any, settings: ReportSettings, out_dir: Path) -> tuple[Intervention, Intervention]:
    """Steering vectors trained on the domain data without KL (general) and with KL (narrow); cached in ``out_dir``."""
    data = TokenDataset.from_conversations(model.tokenizer, settings.domain_data)
    kl_data = TokenDataset.from_conversations(model.tokenizer, settings.kl_data)
    out = []
    for name, weight in (("general", 0.0), ("narrow", settings.kl_weight)):
        path = out_dir / f"{name}.safetensors"
        if path.exists():
            out.append(Intervention.load(path, device=str(next(model.parameters()).device)))
            continue
        vec = SteeringVector.for_model(model)
        config = TrainConfig(
            lr=settings.lr,
            max_steps=settings.steps,
            batch_size=settings.batch_size,
            grad_accum=1,
            kl_weight=weight,
            kl_batch_size=settings.kl_batch_size,
            seed=settings.seed,
        )
        train(model, vec, data, config, kl_dataset=kl_data if weight > 0 else None)
        vec.save(path)
        out.append(vec)
    return out[0], out[1]


def paper_report(model: Any, settings: ReportSettings, out_dir: str | Path) -> dict[str, Any]:
    """Train general + narrow solutions and measure efficiency, stability, pre-training KL and drift.

    Writes four PNG figures and ``results.json`` to ``out_dir`` and returns the numbers.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(settings.seed)
    general, narrow = train_general_and_narrow(model, settings, out_dir)
    data = TokenDataset.from_conversations(model.tokenizer, settings.domain_data)
    alt = TokenDataset.from_conversations(model.tokenizer, settings.kl_data)
    rows = torch.randperm(len(data), generator=torch.Generator().manual_seed(settings.seed))[: settings.eval_rows].tolist()
    eval_set = data.subset(rows)
    alt_eval = alt.subset(list(range(min(settings.eval_rows, len(alt)))))
    solutions = {"general": general, "narrow": narrow}

    results: dict[str, Any] = {"settings": settings.__dict__, "model": model.cfg.model_name, "layer": general.layer}
    results["norms"] = {k: v.norm for k, v in solutions.items()}
    results["cosine_general_narrow"] = cosine_similarity(general, narrow)
    results["base_loss"] = evaluate_loss(model, eval_set)
    results["in_domain_loss"] = {k: evaluate_loss(model, eval_set, v) for k, v in solutions.items()}
    results["alt_domain_loss"] = {
        "base": evaluate_loss(model, alt_eval),
        **{k: evaluate_loss(model, alt_eval, v) for k, v in solutions.items()},
    }

    norms = norm_grid(list(solutions.values()), settings.n_norms)
    eff = {k: efficiency(model, v, eval_set, norms) for k, v in solutions.items()}
    results["efficiency"] = {"norms": norms, "loss": eff}
    plot_efficiency(norms, eff, out_dir / "efficiency.png", title=f"Efficiency ({settings.domain_data})")

    # stability compares solutions at equal norm: rescale both to the smaller norm
    common = min(v.norm for v in solutions.values())
    stab = {k: stability(model, v.scaled_to(common), eval_set, settings.epsilons, settings.seeds) for k, v in solutions.items()}
    results["stability"] = {
        "norm": common,
        "epsilons": list(stab["general"].epsilons),
        "loss_mean": {k: r.mean.tolist() for k, r in stab.items()},
        "relative_mean": {k: r.relative().mean(0).tolist() for k, r in stab.items()},
        "relative_std": {k: r.relative().std(0).tolist() for k, r in stab.items()},
    }
    plot_stability(stab, out_dir / "stability.png")

    texts = TokenDataset.from_texts(model.tokenizer, read_texts(settings.web_text, settings.n_web_docs), max_length=512)
    directions = {**solutions, "random": random_direction_like(general, seed=settings.seed)}
    kl_norms = [float(x) for x in torch.linspace(0, max(results["norms"].values()), 6)]
    pre = pretraining_significance(model, directions, texts, kl_norms)
    results["pretraining_kl"] = {"norms": kl_norms, "kl": pre}
    plot_pretraining_kl(kl_norms, pre, out_dir / "pretraining_kl.png")

    vec = SteeringVector.for_model(model)
    base_cfg: dict[str, Any] = dict(lr=settings.lr, batch_size=settings.batch_size, grad_accum=1, checkpoint_every=5, seed=settings.seed)
    dr = drift(
        model,
        vec,
        data,
        alt,
        TrainConfig(max_steps=settings.drift_steps, kl_weight=settings.kl_weight, kl_batch_size=settings.kl_batch_size, **base_cfg),
        TrainConfig(max_steps=settings.drift_steps, **base_cfg),
        general=general,
    )
    results["drift"] = {
        "steps": dr.steps,
        "phase": dr.phase,
        "explained_variance_ratio": dr.projection.explained_variance_ratio.tolist(),
        "cosine_to_general": dr.cosine_to_reference(),
    }
    plot_drift(dr, out_dir / "drift.png")
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    return results


def markdown_table(results: dict[str, Any]) -> str:
    """The README's summary table of a :func:`paper_report` run."""
    eff = results["efficiency"]
    mid = len(eff["norms"]) // 2
    stab = results["stability"]
    half = min(range(len(stab["epsilons"])), key=lambda i: abs(stab["epsilons"][i] - 0.4))
    pre = results["pretraining_kl"]
    lines = [
        "| metric | general | narrow | random |",
        "| --- | --- | --- | --- |",
        f"| vector norm after training | {results['norms']['general']:.2f} | {results['norms']['narrow']:.2f} | |",
        f"| in-domain loss (base {results['base_loss']:.3f}) | {results['in_domain_loss']['general']:.3f} | {results['in_domain_loss']['narrow']:.3f} | |",
        f"| alternative-domain loss (base {results['alt_domain_loss']['base']:.3f}) | {results['alt_domain_loss']['general']:.3f} | {results['alt_domain_loss']['narrow']:.3f} | |",
        f"| efficiency: in-domain loss at norm {eff['norms'][mid]:.1f} | {eff['loss']['general'][mid]:.3f} | {eff['loss']['narrow'][mid]:.3f} | |",
        f"| stability: relative loss at ε = {stab['epsilons'][half]} (norm {stab['norm']:.1f}) | {stab['relative_mean']['general'][half]:.1f} | {stab['relative_mean']['narrow'][half]:.1f} | |",
        f"| pre-training KL at norm {pre['norms'][-1]:.1f} (nats/token) | {pre['kl']['general'][-1]:.4f} | {pre['kl']['narrow'][-1]:.4f} | {pre['kl']['random'][-1]:.4f} |",
        f"| cosine(general, narrow) | {results['cosine_general_narrow']:.3f} | | |",
        f"| drift: cosine to general, end of KL phase → end of no-KL phase | {_drift_cos(results)} | | |",
    ]
    return "\n".join(lines)


def _drift_cos(results: dict[str, Any]) -> str:
    d = results["drift"]
    last_narrow = max(i for i, p in enumerate(d["phase"]) if p == "narrow (KL)")
    return f"{d['cosine_to_general'][last_narrow]:.3f} → {d['cosine_to_general'][-1]:.3f}"
