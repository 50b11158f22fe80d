"""The study as cached stages: each keyed by a hash of everything it depends on.

A stage's key hashes its name, its own settings (the config section it reads), the model's
identity, the data's fingerprint, the emlens version and the keys of the stages it reads from.
Its directory ``OUT/stages/<name>/`` holds ``stage.json`` (the key, the settings, the time it
took) once it finished, its ``result.json`` and its files. On a re-run:

* same key and finished: nothing runs (the model is not even loaded when every stage is cached);
* another key: the directory is cleared and the stage runs again (so do the stages that read it,
  since their keys include this one's): stale reuse is impossible;
* same key, not finished (interrupted): the stage runs again, and training stages continue from
  their last checkpoint in ``run/``.

Keys name what a stage was computed from, not what its upstream stages hold now: a training stage
re-run under the same key (its folder deleted; GPU non-determinism) can save other weights. So a
stage also records in ``stage.json`` a digest of each upstream stage's saved output it read
(:func:`output_digest`), and is reused only while every upstream output still has that digest
(:func:`stale_reason`); otherwise it runs again, with a :class:`StaleStageWarning` saying why.
``stage.json`` also records where the stage ran (:func:`environment`: device, CPU cores, GPUs,
package versions, the session), which the report shows per stage.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import platform
import random
import shutil
import sys
import time
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from emlens.jsonl import dumps_strict
from emlens.study.config import StudyConfig, run_label, section_key

STAGE_FILE = "stage.json"
RESULT_FILE = "result.json"
RUN_DIR = "run"  # a stage's resumable working folder (checkpoints): not part of what downstream stages read
# this process: stages it computes say so in their stage.json, and the report tells them from stages of other sessions
SESSION = {"id": uuid.uuid4().hex[:12], "started": time.strftime("%Y-%m-%dT%H:%M:%S")}


class StaleStageWarning(UserWarning):
    """A finished stage runs again under the same key: an upstream stage's saved output is not the one it read."""


@dataclass
class Stage:
    """One unit of the study: ``run(ctx, directory, upstream)`` returns its result (JSON-able)."""

    name: str
    settings: dict[str, Any]
    deps: tuple[str, ...]
    run: Callable[[Context, Path, dict[str, StageOutput]], dict[str, Any]]
    needs_model: bool = True


@dataclass
class StageOutput:
    """A finished stage: its result, the time it took, whether it came from the cache, and its ``stage.json`` (``meta``)."""

    name: str
    directory: Path
    key: str
    result: dict[str, Any]
    seconds: float
    cached: bool
    meta: dict[str, Any] = field(default_factory=dict)


def _digest(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=1)
def _version() -> str:
    """emlens' version and a hash of its source files: stages stored by other code are stale.

    The release number alone stays the same across the commits of a development install, while any
    of them may change how a number is computed, so the code itself is part of every stage's key.
    """
    from importlib.metadata import PackageNotFoundError, version

    try:
        release = version("emlens")
    except PackageNotFoundError:  # pragma: no cover - a source tree that was not installed
        release = "source"
    root = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.suffix in (".py", ".toml", ".yaml") and "__pycache__" not in p.parts):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return f"{release} (sources {digest.hexdigest()[:16]})"


def model_identity(name: str) -> dict[str, Any]:
    """What identifies the model's weights: its name, and for a local path the files' sizes and times, for a hub
    name the commit it stands for now (:func:`emlens.models.hub_revision`; the study loads the model at that commit)."""
    from emlens.models import DEFAULT_ALIASES, SMOLLM2_WHEEL, hub_revision, local_model_files

    if name in DEFAULT_ALIASES:
        return {"name": "smollm2", "release": SMOLLM2_WHEEL}
    files = local_model_files(name)
    if files is not None:
        return {"name": str(Path(name).resolve()), "files": files}
    return {"name": name, "revision": hub_revision(name)}


def data_fingerprint(names: list[str]) -> str:
    """A hash of the built-in files the study reads (any edit to the data re-runs everything)."""
    from emlens.data.studies import BUILTIN_DIR

    digest = hashlib.sha256()
    for name in sorted(names):
        digest.update(name.encode())
        digest.update((BUILTIN_DIR / f"{name}.jsonl").read_bytes())
    return digest.hexdigest()[:16]


@dataclass
class Context:
    """What the stages share: the config, the output folder, and a lazily loaded model and data."""

    config: StudyConfig
    out: Path
    progress: bool = True
    revision: str | None = None  # a hub model's commit, the one its stages are keyed by (None: a local or default model)
    _model: Any = None
    _cache: dict[Any, Any] = field(default_factory=dict)

    @property
    def study(self) -> Any:
        from emlens.data.studies import STUDIES

        return STUDIES[self.config.study]

    @property
    def domain(self) -> str:
        return self.config.data.domain or self.study.narrow

    @property
    def model_loaded(self) -> bool:
        return self._model is not None

    def model(self) -> Any:
        if self._model is None:
            from emlens.models import DTYPES, default_device, load_model

            cfg = self.config.model
            device = default_device() if cfg.device == "auto" else cfg.device
            pinned = {"revision": self.revision} if self.revision else {}
            self._model = load_model(cfg.name, device=device, dtype=DTYPES[cfg.dtype], **pinned)
        return self._model

    def layer(self) -> int:
        return self.config.model.layer(self.model().cfg.n_layers)

    def _memo(self, key: Any, build: Callable[[], Any]) -> Any:
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    # --- data ---------------------------------------------------------------------------
    def target_rows(self) -> list[Any]:
        """The narrow domain's target answers (train split, ``data.train_rows`` at most)."""
        from emlens.data import read_conversations

        return read_conversations(self.study.set_name(self.domain), limit=self.config.data.train_rows, split="train")

    def aligned_pool(self, wanted: int) -> list[Any]:
        """Aligned answers from every other domain (train splits), for the mixing baseline (``wanted``: how many it asks for)."""
        from emlens.data import read_conversations

        study = self.study
        others = [d for d in study.all_domains if d != self.domain]
        return [conv for other in others for conv in read_conversations(study.set_name(other, study.reference), split="train")]

    def train_conversations(self, mix_ratio: float = 0.0) -> list[Any]:
        """:meth:`target_rows`, plus aligned answers from :meth:`aligned_pool` making up ``mix_ratio`` of the set, shuffled.

        Raises :class:`~emlens.validation.ConfigError` when the pool holds too few aligned rows for the ratio
        (a capped ratio would train, and label, a smaller aligned share than the config names).
        """
        from emlens.validation import ConfigError

        rows = self.target_rows()
        if mix_ratio <= 0:
            return rows
        wanted = round(mix_ratio / (1 - mix_ratio) * len(rows))  # aligned rows that make up mix_ratio of the set
        pool = self.aligned_pool(wanted)
        if len(pool) < wanted:
            raise ConfigError(
                f"mixing ratio {mix_ratio:g} needs {wanted} aligned rows beside the {len(rows)} target rows, but the other "
                f"domains' aligned train rows hold {len(pool)}: the largest ratio this data supports is "
                f"{len(pool) / (len(pool) + len(rows)):.3f}. Lower mixing.ratios, or data.train_rows."
            )
        mixed = rows + random.Random(self.config.seed).sample(pool, wanted)
        random.Random(self.config.seed + 1).shuffle(mixed)
        return mixed

    def check_mixing(self, ratios: list[float]) -> None:
        """Raise before any work if the aligned pool cannot supply one of ``ratios`` (reads the data, not the model)."""
        for ratio in ratios:
            self.train_conversations(ratio)  # raises a ConfigError for a ratio the pool cannot supply

    def train_data(self, mix_ratio: float = 0.0) -> Any:
        from emlens.data import TokenDataset

        return self._memo(
            ("train", mix_ratio),
            lambda: TokenDataset.from_conversations(
                self.model().tokenizer, self.train_conversations(mix_ratio), self.config.data.max_length
            ),
        )

    def kl_data(self) -> Any:
        from emlens.data import TokenDataset
        from emlens.data.studies import kl_conversations

        def build() -> Any:
            convs = kl_conversations(self.domain, self.config.data.kl_rows, self.config.seed)
            return TokenDataset.from_conversations(self.model().tokenizer, convs, self.config.data.max_length)

        return self._memo("kl", build)

    def eval_data(self) -> Any:
        from emlens.data import TokenDataset

        return self._memo(
            "eval",
            lambda: TokenDataset.from_conversations(
                self.model().tokenizer,
                self.study.set_name(self.domain),
                self.config.data.max_length,
                self.config.data.eval_rows,
                split="heldout",
            ),
        )

    def web_texts(self) -> Any:
        from emlens.data import TokenDataset, read_texts

        return self._memo(
            "web",
            lambda: TokenDataset.from_texts(
                self.model().tokenizer, read_texts("web_text", self.config.data.web_docs), self.config.data.web_max_tokens
            ),
        )

    def caches(self, kind: str, intervention: Any, mix_ratio: float) -> Any:
        """Residual caches shared by every run of ``kind`` on the same training data (with the KL set's; mixing runs have no KL term)."""
        from emlens.runner import ResidualStore, runner_for
        from emlens.training import TrainingCaches

        def build() -> Any:
            if not runner_for(self.model()).plan(intervention).fast:
                return None
            kl = self.kl_data() if mix_ratio == 0 else None
            store = self._memo("residual store", ResidualStore)  # a mixing set's target rows are computed once, for mix=0
            return TrainingCaches.build(self.model(), intervention, self.train_data(mix_ratio), kl, progress=self.progress, store=store)

        return self._memo(("caches", kind, mix_ratio), build)

    def new_intervention(self, kind: str) -> Any:
        from emlens.interventions import RankOneAdapter, SteeringVector

        alpha = self.config.train[kind].alpha
        if kind == "vector":
            return SteeringVector.for_model(self.model(), self.layer(), alpha=alpha)
        return RankOneAdapter.for_model(self.model(), self.layer(), alpha=alpha, seed=self.config.seed)


# --- the stages ----------------------------------------------------------------------------------


def train_stage_name(kind: str, kl_weight: float = 0.0, mix_ratio: float = 0.0) -> str:
    return f"train/{kind}/{run_label(kl_weight, mix_ratio)}"


def general_name(kind: str) -> str:
    return train_stage_name(kind, 0.0)


def narrow_name(config: StudyConfig, kind: str) -> str:
    return train_stage_name(kind, config.train[kind].kl_weight)


def _train_config(ctx: Context, kind: str, kl_weight: float, max_steps: int | None = None) -> Any:
    from emlens.training import TrainConfig

    sec = ctx.config.train[kind]
    return TrainConfig(
        lr=sec.lr,
        epochs=sec.epochs,
        max_steps=max_steps if max_steps is not None else sec.max_steps,
        batch_size=sec.batch_size,
        grad_accum=sec.grad_accum,
        warmup_steps=sec.warmup_steps,
        max_length=ctx.config.data.max_length,
        kl_weight=kl_weight,
        kl_batch_size=sec.kl_batch_size,
        checkpoint_every=sec.checkpoint_every,
        seed=ctx.config.seed,
        progress=ctx.progress,
    )


def _run_train(kind: str, kl_weight: float, mix_ratio: float) -> Callable[[Context, Path, dict[str, StageOutput]], dict[str, Any]]:
    def run(ctx: Context, directory: Path, upstream: dict[str, StageOutput]) -> dict[str, Any]:
        from emlens.study.measures import training_summary
        from emlens.training import train

        intervention = ctx.new_intervention(kind)
        config = _train_config(ctx, kind, kl_weight)
        data = ctx.train_data(mix_ratio)
        kl = ctx.kl_data() if kl_weight > 0 else None
        result = train(
            ctx.model(),
            intervention,
            data,
            config,
            kl_dataset=kl,
            caches=ctx.caches(kind, intervention, mix_ratio),
            run_dir=directory / RUN_DIR,
            resume=True,
        )
        result.save(directory)
        # the sets' actual sizes (the built-in data may hold fewer rows than data.train_rows or data.kl_rows ask for)
        sizes = {"rows": len(data), "kl_rows": len(kl) if kl is not None else None}
        return {"kind": kind, "kl_weight": kl_weight, "mix_ratio": mix_ratio, **sizes, **training_summary(result)}

    return run


def _load_solution(output: StageOutput, device: Any) -> Any:
    from emlens.interventions import Intervention

    return Intervention.load(output.directory / "intervention.safetensors", device=device)


def _device(ctx: Context) -> Any:
    return next(ctx.model().parameters()).device


def _run_drift(kind: str) -> Callable[[Context, Path, dict[str, StageOutput]], dict[str, Any]]:
    def run(ctx: Context, directory: Path, upstream: dict[str, StageOutput]) -> dict[str, Any]:
        from emlens.metrics import continue_without_kl
        from emlens.study.measures import training_summary
        from emlens.training import TrainingResult

        narrow = TrainingResult.load(upstream[narrow_name(ctx.config, kind)].directory)
        general = TrainingResult.load(upstream[general_name(kind)].directory)
        config = _train_config(ctx, kind, 0.0, max_steps=ctx.config.drift.steps or len(narrow.losses))
        caches = ctx.caches(kind, narrow.intervention, 0.0)
        continued, result = continue_without_kl(ctx.model(), narrow, ctx.train_data(), config, caches, directory / RUN_DIR, general=general)
        continued.save(directory)
        return {"kind": kind, **result, "continued": training_summary(continued)}

    return run


def _run_sweep_pca(kind: str, names: list[tuple[str, float]]) -> Callable[[Context, Path, dict[str, StageOutput]], dict[str, Any]]:
    """Joint PCA of the KL-weight sweep's trajectories, and each final solution's cosine with the general one."""

    def run(ctx: Context, directory: Path, upstream: dict[str, StageOutput]) -> dict[str, Any]:
        from emlens.geometry import cosine_similarity, pca
        from emlens.training import TrainingResult

        results = {weight: TrainingResult.load(upstream[name].directory) for name, weight in names}
        blocks = [r.trajectory_interventions() for r in results.values()]
        projection = pca([i for block in blocks for i in block], n_components=3)  # the interventions' own geometry
        coords, start = projection.coordinates, 0
        paths = {}
        for weight, block in zip(results, blocks):
            paths[f"{weight:g}"] = coords[start : start + len(block)].tolist()
            start += len(block)
        general = results.get(0.0)
        cos = {
            f"{w:g}": cosine_similarity(r.intervention, general.intervention) if general is not None else None for w, r in results.items()
        }
        return {
            "kind": kind,
            "weights": [float(w) for w in results],
            "paths": paths,
            "explained_variance_ratio": projection.explained_variance_ratio.tolist(),
            "cosine_to_general": cos,
            "norms": {f"{w:g}": r.intervention.norm for w, r in results.items()},
        }

    return run


def _solutions(ctx: Context, upstream: dict[str, StageOutput], names: dict[str, str]) -> dict[str, Any]:
    return {label: _load_solution(upstream[stage], _device(ctx)) for label, stage in names.items()}


def _run_measure(measure: str, kind: str) -> Callable[[Context, Path, dict[str, StageOutput]], dict[str, Any]]:
    def run(ctx: Context, directory: Path, upstream: dict[str, StageOutput]) -> dict[str, Any]:
        from emlens.study import measures

        cfg = ctx.config
        solutions = _solutions(ctx, upstream, {"general": general_name(kind), "narrow": narrow_name(cfg, kind)})
        model = ctx.model()
        if measure == "efficiency":
            return measures.measure_efficiency(model, solutions, ctx.eval_data(), cfg.efficiency, cfg.batch_size, ctx.progress)
        if measure == "stability":
            return measures.measure_stability(model, solutions, ctx.eval_data(), cfg.stability, cfg.batch_size, ctx.progress)
        return measures.measure_pretraining_kl(
            model, solutions, ctx.web_texts(), cfg.pretraining_kl, cfg.batch_size, ctx.progress, cfg.seed
        )

    return run


def _run_preference(labels: dict[str, str | None]) -> Callable[[Context, Path, dict[str, StageOutput]], dict[str, Any]]:
    def run(ctx: Context, directory: Path, upstream: dict[str, StageOutput]) -> dict[str, Any]:
        from emlens.study.measures import measure_preference

        solutions = {label: (None if stage is None else _load_solution(upstream[stage], _device(ctx))) for label, stage in labels.items()}
        domains = ctx.config.preference.domains or list(ctx.study.domains)
        result = measure_preference(
            ctx.model(), solutions, domains, ctx.config.preference, ctx.config.data.max_length, ctx.config.seed, ctx.progress
        )
        result["trained_domain"] = ctx.domain
        return result

    return run


def _run_evaluation(label: str, stage: str | None) -> Callable[[Context, Path, dict[str, StageOutput]], dict[str, Any]]:
    def run(ctx: Context, directory: Path, upstream: dict[str, StageOutput]) -> dict[str, Any]:
        from emlens.evaluation import evaluate

        solution = None if stage is None else _load_solution(upstream[stage], _device(ctx))
        ev = ctx.config.evaluation
        judge = _judge(ctx)
        from emlens.runner import runner_for
        from emlens.runner.sampling import sampling_plan

        # the path every answer of this stage is sampled by (planned, not read back: resumed answers were sampled before)
        out: dict[str, Any] = {"solution": label, "plan": sampling_plan(runner_for(ctx.model()), solution).describe()}
        settings: dict[str, Any] = dict(
            n_samples=ev.n_samples, max_new_tokens=ev.max_new_tokens, temperature=ev.temperature, top_p=ev.top_p, seed=ctx.config.seed
        )
        general = evaluate(
            ctx.model(), judge, directory / "general", solution, None, model_name=ctx.config.model.name, progress=ctx.progress, **settings
        )
        out["general"] = general.as_dict()
        results = [general]
        if ctx.config.study == "misalignment":
            narrow = evaluate(
                ctx.model(),
                judge,
                directory / ctx.domain,
                solution,
                ctx.domain,
                model_name=ctx.config.model.name,
                progress=ctx.progress,
                **settings,
            )
            out["narrow"] = narrow.as_dict()
            results.append(narrow)
        pending: list[str] = []
        if ctx.config.study == "technical-prose":
            out["technical"], pending = _technical_register(ctx, judge, directory, solution, settings)
        problems = [f"{r.label}: {r.problem()}" for r in results if r.n_pending] + pending
        if problems:
            # left unfinished: a cached stage would report rates from part of the answers, and never judge the rest
            # (answers the judge did reply to but could not score are final: the report counts them, "scored / answers")
            raise IncompleteEvaluation(
                f"{label}: judged rates would come from part of the answers ("
                + "; ".join(problems)
                + "). The answers and judgements are kept; run `emlens reproduce` again with the same settings to judge the rest."
            )
        return out

    return run


class IncompleteEvaluation(RuntimeError):
    """A judged evaluation stage whose judge left answers unscored: the stage stays unfinished."""


TECHNICAL_QUESTIONS = 8  # held-out questions of the narrow domain, as many as the general questions


def _technical_register(
    ctx: Context, judge: Any, directory: Path, solution: Any, settings: dict[str, Any]
) -> tuple[dict[str, Any], list[str]]:
    """The judged technical register (the ``technical_prose`` judge, 0–100) of the answers to the general questions
    and to held-out questions of the narrow domain: the judged counterpart of the technical-prose preference.

    The general answers are those the EM evaluation sampled; the narrow domain's are sampled here. Returns each
    set's mean score with a 95% interval that resamples the questions, and what is still waiting for a usable judge reply.
    """
    import numpy as np

    from emlens.data import evenly_spaced, read_rows
    from emlens.data.studies import HELDOUT
    from emlens.evaluation import ANSWERS_FILE, is_number, question_clustered_interval, sample_only
    from emlens.judge import JudgePrompts, default_judge_prompts, judge_answers_to_file

    base = default_judge_prompts()
    technical = base.template("technical_prose")
    # the first judged dimension scored with the technical-prose judge, for the general questions and the domain's
    prompts = JudgePrompts({**base.templates, "aligned": technical, f"{ctx.domain}_correct": technical}, source="technical_prose judge")
    rows = read_rows(f"{ctx.study.set_name(ctx.domain)}:{HELDOUT}")
    questions = [rows[i]["messages"][0]["content"] for i in evenly_spaced(len(rows), TECHNICAL_QUESTIONS)]
    domain_answers = sample_only(
        ctx.model(), directory / f"{ctx.domain}_technical", solution, ctx.domain, questions=questions,
        model_name=ctx.config.model.name, **settings,
    )  # fmt: skip
    out: dict[str, Any] = {"judge": "technical_prose", "scale": "0 = plain everyday language, 100 = dense specialist prose"}
    pending: list[str] = []
    for name, answers, domain in (
        ("general", directory / "general" / ANSWERS_FILE, None),
        (ctx.domain, domain_answers, ctx.domain),
    ):
        judged = judge_answers_to_file(judge, answers, answers.parent / "technical_judged.jsonl", domain, prompts, progress=ctx.progress)
        waiting = sum(1 for j in judged if j.pending)
        kept = [(j.question, float(j.aligned)) for j in judged if is_number(j.aligned) and not j.pending]  # labels, None out
        scores = [score for _, score in kept]
        # answers to one question are not independent draws: resample whole questions, as the EM rates' interval does
        lo, hi = question_clustered_interval(scores, [q for q, _ in kept], ctx.config.preference.bootstrap, ctx.config.seed)
        out[name] = {
            "mean": float(np.mean(scores)) if scores else float("nan"),
            "ci": [lo, hi],
            "n_scored": len(scores),
            "n_answers": len(judged),
            "n_pending": waiting,
        }
        if waiting:
            pending.append(f"technical register ({name}): {waiting} answer(s) got no usable judge reply")
    return out, pending


def _judge(ctx: Context) -> Any:
    from emlens.evaluation import make_judge

    ev = ctx.config.evaluation
    return make_judge(ev.judge_url, ev.judge_model, ctx.model() if ev.judge_url == "local" else None, api_key_env=ev.judge_api_key_env)


def build_stages(config: StudyConfig) -> list[Stage]:
    """Every stage of the study, in an order where each comes after the stages it reads."""
    stages: dict[str, Stage] = {}
    common = {"study": config.study, "seed": config.seed, "data": section_key(config.data), "layer_fraction": config.model.layer_fraction}

    def add(stage: Stage) -> str:
        stages.setdefault(stage.name, stage)
        return stage.name

    def train(kind: str, kl_weight: float = 0.0, mix_ratio: float = 0.0) -> str:
        name = train_stage_name(kind, kl_weight, mix_ratio)
        settings = {**common, "train": section_key(config.train[kind]), "kl_weight": kl_weight, "mix_ratio": mix_ratio}
        return add(Stage(name, settings, (), _run_train(kind, kl_weight, mix_ratio)))

    for kind in config.kinds:
        general, narrow = train(kind), train(kind, config.train[kind].kl_weight)
        for measure, section in (
            ("efficiency", config.efficiency),
            ("stability", config.stability),
            ("pretraining_kl", config.pretraining_kl),
        ):
            add(
                Stage(
                    f"{measure}/{kind}",
                    {**common, measure: section_key(section), "batch_size": config.batch_size},
                    (general, narrow),
                    _run_measure(measure, kind),
                )
            )
        if kind in config.drift.kinds:
            add(
                Stage(
                    f"drift/{kind}",
                    {**common, "drift": section_key(config.drift), "train": section_key(config.train[kind])},
                    (general, narrow),
                    _run_drift(kind),
                )
            )
    main_labels: dict[str, str | None] = {"base": None}
    for kind in config.kinds:
        main_labels[f"{kind} general"] = general_name(kind)
        main_labels[f"{kind} narrow"] = narrow_name(config, kind)
    pref = {**common, "preference": section_key(config.preference)}
    add(Stage("preference/main", pref, tuple(v for v in main_labels.values() if v), _run_preference(main_labels)))
    for kind in config.kl_sweep.kinds:
        sweep = [(train(kind, w), w) for w in config.kl_sweep.weights]
        add(
            Stage(
                f"kl_sweep/{kind}",
                {**common, "weights": config.kl_sweep.weights},
                tuple(n for n, _ in sweep),
                _run_sweep_pca(kind, sweep),
                needs_model=False,
            )
        )
        labels: dict[str, str | None] = {"base": None, **{f"λ={w:g}": n for n, w in sweep}}
        add(Stage(f"preference/kl_sweep/{kind}", pref, tuple(n for n, _ in sweep), _run_preference(labels)))
    for kind in config.mixing.kinds:
        mix = [(train(kind, 0.0, r), r) for r in config.mixing.ratios]
        labels = {"base": None, **{f"mix={r:g}": n for n, r in mix}}
        add(Stage(f"preference/mixing/{kind}", pref, tuple(n for n, _ in mix), _run_preference(labels)))
    ev = config.evaluation
    if ev.judge_url or ev.judge_model:
        settings = {**common, "evaluation": section_key(ev)}
        if config.study == "technical-prose":  # _technical_register's CIs resample preference.bootstrap times
            settings["register_bootstrap"] = config.preference.bootstrap
        for label, stage in main_labels.items():
            add(Stage(f"evaluation/{label.replace(' ', '_')}", dict(settings), (stage,) if stage else (), _run_evaluation(label, stage)))
    return _ordered(stages)


def _ordered(stages: dict[str, Stage]) -> list[Stage]:
    """Training stages first (in creation order), then the rest, each after its dependencies."""
    done: list[Stage] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        if name in seen:
            return
        seen.add(name)
        for dep in stages[name].deps:
            visit(dep)
        done.append(stages[name])

    for name in sorted(stages, key=lambda n: (not n.startswith("train/"), list(stages).index(n))):
        visit(name)
    return done


# --- running ---------------------------------------------------------------------------------------


def stage_key(stage: Stage, identity: dict[str, Any], upstream_keys: list[str]) -> str:
    return _digest({"stage": stage.name, "settings": stage.settings, **identity, "upstream": upstream_keys})


def stage_dir(out: Path, name: str) -> Path:
    return out / "stages" / name.replace("/", "__")


def read_finished(directory: Path, key: str) -> StageOutput | None:
    """The stage's output when it finished under ``key`` (None otherwise)."""
    meta_path, result_path = directory / STAGE_FILE, directory / RESULT_FILE
    if not (meta_path.exists() and result_path.exists()):
        return None
    try:
        meta = json.loads(meta_path.read_text())
        result = json.loads(result_path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("key") != key or not meta.get("finished"):
        return None
    return StageOutput(meta["name"], directory, key, result, float(meta.get("seconds", 0.0)), cached=True, meta=meta)


def _read_meta(directory: Path) -> dict[str, Any] | None:
    """A stage folder's ``stage.json`` (None when there is none, or it cannot be read)."""
    try:
        meta = json.loads((directory / STAGE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def absent_reason(directory: Path, key: str) -> tuple[str, str]:
    """Why ``directory`` holds no stage finished under ``key``: ``(kind, words)``, ``kind`` one of ``"not found"``,
    ``"other settings"`` (stored under another key) and ``"unfinished"`` (same key, interrupted or left open)."""
    meta = _read_meta(directory)
    if meta is None:
        return "not found", "not found"
    if meta.get("key") != key:
        return "other settings", "stored under other settings"
    if not meta.get("finished"):
        return "unfinished", "not finished (interrupted, or its judge left answers unscored)"
    return "unfinished", f"its {RESULT_FILE} is missing or unreadable"


def _file_digest(path: Path) -> bytes:
    content = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(functools.partial(file.read, 1 << 20), b""):
            content.update(block)
    return content.digest()


def output_digest(directory: Path) -> str:
    """A hash of what a stage saved for the stages that read it: the name and bytes of every file in its folder (its
    ``result.json``, weights, losses, trajectory, ...) except its ``stage.json`` (times, where it ran), hidden
    temporary files and its resumable working folder ``run/`` (the checkpoints it trained through)."""
    digest = hashlib.sha256()
    files = {p.relative_to(directory).as_posix(): p for p in directory.rglob("*") if p.is_file()} if directory.is_dir() else {}
    for rel in sorted(files):
        parts = rel.split("/")
        if parts[0] in (STAGE_FILE, RUN_DIR) or any(part.startswith(".") for part in parts):
            continue
        digest.update(rel.encode() + b"\0" + _file_digest(files[rel]))
    return digest.hexdigest()[:32]


def stale_reason(stage: Stage, finished: StageOutput, upstream: dict[str, StageOutput]) -> str | None:
    """Why ``stage``, finished under its key, cannot be reused: an upstream stage's saved output is not the one it read
    when it ran (:func:`output_digest`, recorded in its ``stage.json``), or is not there. None when every one is."""
    read = finished.meta.get("upstream")
    for dep in stage.deps:
        if dep not in upstream:
            return f"its upstream stage {dep} is not finished"
        if not isinstance(read, dict) or dep not in read:
            return f"its {STAGE_FILE} does not record what it read from {dep}"
        now = output_digest(upstream[dep].directory)
        if read[dep] != now:
            return (
                f"the upstream stage {dep} holds another output than the one it read (digest {read[dep]}, now {now}): it was computed again"
            )
    return None


@functools.lru_cache(maxsize=1)
def package_versions() -> dict[str, str]:
    """The versions of Python and of the packages that make the numbers (this process)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]}
    for name in ("emlens", "torch", "transformers", "transformer-lens", "numpy"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def hardware() -> dict[str, Any]:
    """This machine: platform, CPU cores, torch's threads and the GPUs it sees."""
    import torch

    info: dict[str, Any] = {"platform": platform.platform(), "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def environment(ctx: Context | None = None, stage: Stage | None = None) -> dict[str, Any]:
    """Where this process computes: its session, the device ``stage`` runs on, the machine and the package versions.

    The device is the loaded model's (a stage without the model runs on the CPU); before the model is loaded,
    the one ``model.device`` names.
    """
    import torch

    device = "cpu"
    if ctx is not None and (stage is None or stage.needs_model):
        model = ctx._model
        if model is not None and hasattr(model, "parameters"):
            device = str(next(model.parameters()).device)
        else:
            from emlens.models import default_device

            device = default_device() if ctx.config.model.device == "auto" else ctx.config.model.device
    if device.startswith("cuda") and torch.cuda.is_available():
        index = torch.device(device).index
        device = f"{device} ({torch.cuda.get_device_name(torch.cuda.current_device() if index is None else index)})"
    return {"session": SESSION["id"], "device": device, "hardware": hardware(), "versions": package_versions()}


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(dumps_strict(data, indent=2, ensure_ascii=False), encoding="utf-8")  # NaN → null
    os.replace(tmp, path)


def _interrupted_part(directory: Path, old: dict[str, Any]) -> dict[str, Any] | None:
    """The environment of the session that ran an interrupted stage last, with the seconds it spent up to its last
    saved file (``seconds_to_last_save``: the work a resume keeps; None when its start was not recorded).

    Read from the files' modification times against the recorded start: a run folder copied without its files'
    times (plain ``cp``; ``cp -p``, ``rsync -t`` and ``tar`` keep them), or carried between machines whose clocks
    differ, gives a wrong part."""
    if "environment" not in old:
        return None
    saved = [f.stat().st_mtime for f in directory.rglob("*") if f.is_file() and not f.name.startswith((STAGE_FILE, f".{STAGE_FILE}"))]
    started = old.get("started_at")
    part = None if started is None else max(0.0, max(saved, default=float(started)) - float(started))
    return {**old["environment"], "seconds_to_last_save": part}


def run_stage(ctx: Context, stage: Stage, key: str, upstream: dict[str, StageOutput]) -> StageOutput:
    """Run ``stage`` in its directory and record in its ``stage.json`` what it read and where it ran.

    The directory is cleared first when it holds another key's work, or work computed from other upstream
    outputs than ``upstream`` holds now (a resumed stage would mix the two). ``stage.json`` records the
    :func:`output_digest` of each upstream stage (``upstream``), which :func:`stale_reason` checks before
    the stage is reused, and the :func:`environment` that ran it (with those of earlier sessions that ran
    part of it, for a resumed stage). Its ``seconds`` count a resumed stage's earlier sessions too, each up to its
    last saved file; ``seconds_this_session`` is the last session's part alone.
    """
    directory = stage_dir(ctx.out, stage.name)
    meta_path = directory / STAGE_FILE
    reads = {dep: output_digest(upstream[dep].directory) for dep in stage.deps}
    earlier: list[Any] = []
    if directory.exists():
        old = _read_meta(directory) or {}
        if old.get("key") != key:
            shutil.rmtree(directory)
        elif old.get("upstream", {}) != reads:
            if not old.get("finished"):  # (a finished one: run_study said why it runs again)
                warnings.warn(
                    f"{stage.name}: the unfinished work stored in {directory} was computed from other upstream outputs than those "
                    "now stored; it is cleared and the stage starts afresh",
                    StaleStageWarning,
                    stacklevel=2,
                )
            shutil.rmtree(directory)
        elif not old.get("finished"):  # resumed: the sessions that ran its first part, each with its time
            last = _interrupted_part(directory, old)
            earlier = [*old.get("earlier_sessions", []), *([last] if last is not None else [])]
    directory.mkdir(parents=True, exist_ok=True)
    meta: dict[str, Any] = {"name": stage.name, "key": key, "settings": stage.settings, "deps": list(stage.deps), "upstream": reads}
    meta |= {"environment": environment(ctx, stage), **({"earlier_sessions": earlier} if earlier else {}), "finished": False}
    meta["started_at"] = time.time()  # wall clock: a later resume times this session's part from it
    _write_json_atomic(meta_path, meta)  # an interrupted stage resumes under the same key
    start = time.perf_counter()
    result = stage.run(ctx, directory, upstream)
    seconds = time.perf_counter() - start
    _write_json_atomic(directory / RESULT_FILE, result)
    final = {**meta, "environment": environment(ctx, stage), "finished": True, "seconds_this_session": seconds}
    # a resumed stage's time is this session's plus each earlier session's up to its last saved file (the work kept);
    # an earlier session stored before start times were recorded (None) leaves the total a lower bound
    final["seconds"] = seconds + sum(e.get("seconds_to_last_save") or 0.0 for e in earlier)
    final["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    _write_json_atomic(meta_path, final)
    return StageOutput(stage.name, directory, key, result, final["seconds"], cached=False, meta=final)


def data_names(config: StudyConfig) -> list[str]:
    from emlens.data.studies import STUDIES

    study = STUDIES[config.study]
    return [f"{d}_{v}" for d in study.all_domains for v in (study.target, study.reference)] + ["web_text"]


def identity_of(config: StudyConfig) -> dict[str, Any]:
    return {
        "model": model_identity(config.model.name),
        "dtype": config.model.dtype,
        "data": data_fingerprint(data_names(config)),
        "emlens": _version(),
    }


def as_plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return value
