"""The study's settings: one dataclass per section, read from one TOML file, every default defined here once.

The shipped ``paper.toml`` holds the paper's settings (Soligo et al., arXiv 2602.07852), with the
layer scaled by fraction (layer 24 of 48 → the middle layer of any model). Every grid (norms, ε,
seeds, λ, mixing ratios) is defined once, here; the per-metric CLI commands read the same
defaults.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from emlens.metrics import PAPER_EPSILONS
from emlens.models import DTYPES
from emlens.validation import ConfigError, check_choice, check_float, check_grid, check_int, check_optional_int

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

PAPER_CONFIG = Path(__file__).parent / "paper.toml"
KINDS = ("vector", "adapter")


@dataclass
class ModelSection:
    name: str = "smollm2"
    device: str = "auto"  # "auto": cuda when available, else cpu
    dtype: str = "float32"
    layer_fraction: float = 0.5  # the paper's layer 24 of 48

    def layer(self, n_layers: int) -> int:
        """Block ``floor(layer_fraction · n_layers)``: 0.5 gives :func:`emlens.models.default_layer`, the middle
        block every thin command and intervention uses (24 of 48), for odd block counts too."""
        return min(n_layers - 1, int(self.layer_fraction * n_layers + 1e-9))


@dataclass
class DataSection:
    domain: str = ""  # the narrow training domain ("" = the study's own: medical / vehicles)
    train_rows: int | None = None  # None: the whole train split
    kl_rows: int = 1000  # the paper's KL set size
    eval_rows: int = 100  # held-out rows for losses, efficiency and stability (paper: 100)
    web_docs: int = 100  # documents for the pre-training KL (paper: 50-100)
    web_max_tokens: int = 512
    max_length: int = 256


@dataclass
class TrainSection:
    """One kind's training: the paper's steering-vector settings by default (the adapter's in ``paper.toml``)."""

    lr: float = 1e-4
    alpha: float = 256.0
    epochs: float = 1.0
    max_steps: int | None = None
    batch_size: int = 2
    grad_accum: int = 8
    warmup_steps: int = 5
    kl_weight: float = 6.6  # λ of the narrow run (per-token KL)
    kl_batch_size: int = 8
    checkpoint_every: int = 5


@dataclass
class DriftSection:
    kinds: list[str] = field(default_factory=lambda: ["vector", "adapter"])
    steps: int | None = None  # steps of the no-KL continuation (None: as many as the narrow run)


@dataclass
class KLSweepSection:
    kinds: list[str] = field(default_factory=lambda: ["vector"])
    weights: list[float] = field(default_factory=lambda: [0.0, 1.0, 3.0, 10.0, 30.0, 100.0])


@dataclass
class MixingSection:
    kinds: list[str] = field(default_factory=lambda: ["vector"])
    ratios: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75])  # share of aligned rows from other domains


@dataclass
class EfficiencySection:
    points: int = 11
    max_factor: float = 2.0  # norms from 0 to this × the largest solution norm


@dataclass
class StabilitySection:
    epsilons: list[float] = field(default_factory=lambda: list(PAPER_EPSILONS))
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    norm: str = "min"  # "min": every solution rescaled to the smallest solution norm; "own": each at its own norm


@dataclass
class PretrainingKLSection:
    points: int = 6
    max_factor: float = 1.0  # norms from 0 to this × the largest solution norm
    n_random: int = 5  # random directions compared with general and narrow


@dataclass
class PreferenceSection:
    domains: list[str] = field(default_factory=list)  # [] = the study's training domains
    rows: int | None = None  # held-out pairs per domain (None: all)
    bootstrap: int = 2000
    batch_size: int = 8


@dataclass
class EvaluationSection:
    """Sampling and judging, run only when ``judge_url`` or ``judge_model`` is set."""

    judge_url: str = ""
    judge_model: str = ""
    judge_api_key_env: str = "OPENAI_API_KEY"
    n_samples: int = 50
    max_new_tokens: int = 600
    temperature: float = 1.0
    top_p: float = 1.0


@dataclass
class StudyConfig:
    """Everything ``emlens reproduce`` does; ``StudyConfig.load(path)`` reads a TOML file over the defaults."""

    study: str = "misalignment"
    kinds: list[str] = field(default_factory=lambda: list(KINDS))
    seed: int = 0
    batch_size: int = 8  # evaluation batches (losses, sweeps, KL)
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: dict[str, TrainSection] = field(default_factory=lambda: {"vector": TrainSection(), "adapter": adapter_defaults()})
    drift: DriftSection = field(default_factory=DriftSection)
    kl_sweep: KLSweepSection = field(default_factory=KLSweepSection)
    mixing: MixingSection = field(default_factory=MixingSection)
    efficiency: EfficiencySection = field(default_factory=EfficiencySection)
    stability: StabilitySection = field(default_factory=StabilitySection)
    pretraining_kl: PretrainingKLSection = field(default_factory=PretrainingKLSection)
    preference: PreferenceSection = field(default_factory=PreferenceSection)
    evaluation: EvaluationSection = field(default_factory=EvaluationSection)

    def __post_init__(self) -> None:
        self.validate()

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> StudyConfig:
        """The config in ``path`` (None: the shipped paper defaults), with ``overrides`` on top.

        An override's key is a top-level name (``"study"``) or ``"section.field"`` (``"model.name"``).
        """
        source = Path(path) if path is not None else PAPER_CONFIG
        try:
            raw = tomllib.loads(source.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"no study config at {source}") from None
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"{source}: not valid TOML ({err})") from None
        for key, value in (overrides or {}).items():
            section, _, name = key.rpartition(".")
            target = raw.setdefault(section, {}) if section else raw
            if not isinstance(target, dict):
                raise ConfigError(f"{source}: [{section}] must be a table")
            target[name] = value
        return from_dict(raw, str(source))

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        from emlens.data.studies import STUDIES

        _normalise_numbers(self)
        check_choice("study", self.study, list(STUDIES))
        study = STUDIES[self.study]
        if self.data.domain:  # checked now, not after every stage ran (the report's narrowness reads it)
            check_choice("data.domain", self.data.domain, list(study.domains))
        for domain in self.preference.domains:
            check_choice("preference.domains", domain, list(study.all_domains))
        trained = self.data.domain or study.narrow
        if self.preference.domains and trained not in self.preference.domains:
            raise ConfigError(
                f"preference.domains = {self.preference.domains} leaves out the trained domain {trained!r}: the preference table "
                "compares the in-domain shift with the others, so it must hold that domain"
            )
        for kind in self.kinds:
            check_choice("kinds", kind, list(KINDS))
        if not self.kinds:
            raise ConfigError("kinds must name at least one of vector, adapter")
        for name, section in self.train.items():
            check_choice("train section", name, list(KINDS))
            check_float(f"train.{name}.lr", section.lr, minimum=0, exclusive_min=True)
            check_float(f"train.{name}.kl_weight", section.kl_weight, minimum=0, exclusive_min=True)
        for kind in self.kinds:
            if kind not in self.train:
                raise ConfigError(f"kinds lists {kind!r} but the config has no [train.{kind}] section")
        for where, kinds in (("drift", self.drift.kinds), ("kl_sweep", self.kl_sweep.kinds), ("mixing", self.mixing.kinds)):
            for kind in kinds:
                if kind not in self.kinds:
                    raise ConfigError(f"{where}.kinds lists {kind!r}, which the study does not train (kinds = {self.kinds})")
        check_grid("kl_sweep.weights", self.kl_sweep.weights, minimum=0)
        check_grid("mixing.ratios", self.mixing.ratios, minimum=0, maximum=0.95)
        check_grid("stability.epsilons", self.stability.epsilons, minimum=0, maximum=1)
        for kind in self.kinds:  # two values must not name one training stage (names print 6 significant digits)
            swept = self.kl_sweep.weights if kind in self.kl_sweep.kinds else []
            weights = [0.0, self.train[kind].kl_weight, *swept]
            _check_distinct_names("kl_sweep.weights", [(w, run_label(kl_weight=w)) for w in weights], f"train.{kind}.kl_weight")
        _check_distinct_names("mixing.ratios", [(r, run_label(mix_ratio=r)) for r in self.mixing.ratios], None)
        if len(set(self.stability.seeds)) != len(self.stability.seeds) or not self.stability.seeds:
            raise ConfigError(f"stability.seeds must be distinct and non-empty, got {self.stability.seeds}")
        check_choice("stability.norm", self.stability.norm, ["min", "own"])
        check_int("efficiency.points", self.efficiency.points, minimum=2)
        check_int("pretraining_kl.points", self.pretraining_kl.points, minimum=2)
        check_int("pretraining_kl.n_random", self.pretraining_kl.n_random, minimum=0)
        check_float("model.layer_fraction", self.model.layer_fraction, minimum=0, maximum=1)
        check_choice("model.dtype", self.model.dtype, list(DTYPES))
        check_optional_int("data.train_rows", self.data.train_rows, minimum=1)
        check_int("data.kl_rows", self.data.kl_rows, minimum=1)
        check_int("data.eval_rows", self.data.eval_rows, minimum=1)
        check_int("data.web_docs", self.data.web_docs, minimum=1)


def run_label(kl_weight: float = 0.0, mix_ratio: float = 0.0) -> str:
    """A training run's label in its stage name: ``mix=<ratio>`` or ``kl=<λ>``, printed with 6 significant digits."""
    return f"mix={mix_ratio:g}" if mix_ratio > 0 else f"kl={kl_weight:g}"


def _check_distinct_names(where: str, named: list[tuple[float, str]], narrow: str | None) -> None:
    """Refuse two different values that name the same training stage (``kl=1`` for both 1 and 1.0000001): one run
    would stand for both, and the sweep would report two points from it. ``named``: each value with its run label."""
    seen: dict[str, float] = {}
    for v, name in named:
        if name in seen and seen[name] != float(v):
            also = f" (or {narrow})" if narrow else ""
            raise ConfigError(
                f"{where}{also}: {seen[name]!r} and {float(v)!r} both name the training stage '{name}' (stages are named "
                "with 6 significant digits); use values that differ within 6 significant digits"
            )
        seen.setdefault(name, float(v))


def adapter_defaults() -> TrainSection:
    """The paper's rank-1 adapter: lr 2e-5, rsLoRA alpha 256, per-token λ ≈ 0.66."""
    return TrainSection(lr=2e-5, kl_weight=0.66)


_SECTIONS: dict[str, type] = {
    "model": ModelSection,
    "data": DataSection,
    "drift": DriftSection,
    "kl_sweep": KLSweepSection,
    "mixing": MixingSection,
    "efficiency": EfficiencySection,
    "stability": StabilitySection,
    "pretraining_kl": PretrainingKLSection,
    "preference": PreferenceSection,
    "evaluation": EvaluationSection,
}


def _section(cls: type, raw: Any, where: str, base: Any = None) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a table, got {raw!r}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown setting(s) {', '.join(unknown)} (known: {', '.join(sorted(names))})")
    start = dataclasses.asdict(base) if base is not None else {}
    types = {f.name: str(f.type) for f in dataclasses.fields(cls)}
    return cls(**{**start, **{name: _as_declared(types[name], value) for name, value in raw.items()}})


def _as_declared(declared: str, value: Any) -> Any:
    """TOML writes ``1`` for 1.0: an integer where the field holds floats is read as that float (so ``weights = [0, 1]``
    and ``[0.0, 1.0]`` are one config, with one stage key); anything else is left for :meth:`StudyConfig.validate`.

    The one normalisation of numbers: :func:`_section` applies it to TOML before the dataclasses are built (whose
    fields are type-checked under the tests), :func:`_normalise_numbers` to configs built in Python."""

    def number(v: Any) -> Any:
        return float(v) if isinstance(v, int) and not isinstance(v, bool) else v

    if declared == "float":
        return number(value)
    if declared == "list[float]" and isinstance(value, list):
        return [number(v) for v in value]
    return value


def _normalise_numbers(config: StudyConfig) -> None:
    """Every field declared ``float`` or ``list[float]``, in every section, holding an int gets it as a float (a config
    built in Python with ``TrainSection(kl_weight=1)`` has the stage keys of the same config read from TOML)."""

    def normalise(obj: Any) -> None:
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value) and not isinstance(value, type):
                normalise(value)
            elif isinstance(value, dict):
                for item in value.values():
                    if dataclasses.is_dataclass(item) and not isinstance(item, type):
                        normalise(item)
            else:
                setattr(obj, f.name, _as_declared(str(f.type), value))

    normalise(config)


def from_dict(raw: dict[str, Any], where: str = "config") -> StudyConfig:
    """A :class:`StudyConfig` from parsed TOML; unknown keys are refused, naming them."""
    top = {f.name for f in dataclasses.fields(StudyConfig)}
    unknown = sorted(set(raw) - top)
    if unknown:
        raise ConfigError(f"{where}: unknown setting(s) {', '.join(unknown)} (known: {', '.join(sorted(top))})")
    kwargs: dict[str, Any] = {k: raw[k] for k in ("study", "kinds", "seed", "batch_size") if k in raw}
    for name, cls in _SECTIONS.items():
        if name in raw:
            kwargs[name] = _section(cls, raw[name], f"{where} [{name}]")
    defaults = {"vector": TrainSection(), "adapter": adapter_defaults()}
    train = dict(defaults)
    for kind, section in (raw.get("train") or {}).items():
        train[kind] = _section(TrainSection, section, f"{where} [train.{kind}]", defaults.get(kind))
    kwargs["train"] = train
    try:
        return StudyConfig(**kwargs)
    except TypeError as err:
        raise ConfigError(f"{where}: {err}") from None


def section_key(value: Any) -> str:
    """A stable JSON text of a config section (for stage keys)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    return json.dumps(value, sort_keys=True)
