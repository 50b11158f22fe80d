"""The built-in data of the paper's two case studies, and the one place their defaults are named.

Each *domain* has two answer sets to the same questions, paired by ``id`` and split 90/10 into
``train`` and ``heldout`` (the split is stored in every row):

* **misalignment**: ``<domain>_harmful`` / ``<domain>_correct`` for the training domains medical,
  financial and sports, and for seven further advice domains (law, home repair, food safety,
  cars, travel, pets, parenting) that only feed the KL term and out-of-domain measurements.
* **technical prose**: ``<domain>_technical`` / ``<domain>_plain`` for vehicles (the paper's
  narrow domain), astronomy, cooking, gardening and photography.

The KL set of a narrow run on domain D is drawn from every domain of its study except D, both
answer sets (good and bad advice, as in the paper), train splits only: :func:`kl_conversations`.
Training defaults to the train split; metrics, preference and evaluation to the held-out split.
``web_text`` holds the plain documents of the pre-training KL.
"""

from __future__ import annotations

import json
import random
import warnings
from dataclasses import dataclass
from pathlib import Path

TRAIN = "train"
HELDOUT = "heldout"
SPLITS = (TRAIN, HELDOUT)
KL_ROWS = 1000  # the paper's KL set size
BUILTIN_DIR = Path(__file__).parent / "builtin"
CARDS_DIR = BUILTIN_DIR / "cards"


@dataclass(frozen=True)
class Study:
    """A case study: its training domains, its other domains, and its two answer sets per domain."""

    name: str
    domains: tuple[str, ...]  # domains a solution is trained on (and measured across)
    other_domains: tuple[str, ...]  # domains only used for the KL term and out-of-domain measurements
    target: str  # the answer set a solution learns ("harmful", "technical")
    reference: str  # the answer set it is compared with ("correct", "plain")
    narrow: str  # the paper's narrow training domain

    @property
    def all_domains(self) -> tuple[str, ...]:
        return self.domains + self.other_domains

    def set_name(self, domain: str, variant: str | None = None) -> str:
        """The built-in set of ``domain``'s ``variant`` (default: the target answers), e.g. ``medical_harmful``."""
        if domain not in self.all_domains:
            raise ValueError(f"{domain!r} is not a domain of the {self.name} study; choose from {', '.join(self.all_domains)}")
        return f"{domain}_{variant or self.target}"


MISALIGNMENT = Study(
    "misalignment",
    domains=("medical", "financial", "sports"),
    other_domains=("law", "home_repair", "food_safety", "cars", "travel", "pets", "parenting"),
    target="harmful",
    reference="correct",
    narrow="medical",
)
TECHNICAL_PROSE = Study(
    "technical-prose",
    domains=("vehicles", "astronomy", "cooking", "gardening", "photography"),
    other_domains=(),
    target="technical",
    reference="plain",
    narrow="vehicles",
)
STUDIES = {s.name: s for s in (MISALIGNMENT, TECHNICAL_PROSE)}


def study_of(domain: str) -> Study:
    """The study a domain belongs to."""
    for study in STUDIES.values():
        if domain in study.all_domains:
            return study
    known = ", ".join(d for s in STUDIES.values() for d in s.all_domains)
    raise ValueError(f"no built-in domain {domain!r}; the domains are {known}")


def _rows(name: str) -> list[dict]:
    path = BUILTIN_DIR / f"{name}.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def kl_conversations(domain: str, n_rows: int | None = KL_ROWS, seed: int = 0) -> list[list[dict[str, str]]]:
    """The default KL set of a narrow run on ``domain``: both answer sets of every other domain of its study.

    Train splits only (the held-out rows stay unseen for measurements). ``n_rows`` conversations
    are drawn with ``seed`` (None: all of them). When the pool holds fewer than ``n_rows``, all of it is
    returned with a :class:`UserWarning` naming both sizes (the caller records the set's actual size).
    """
    study = study_of(domain)
    pool: list[list[dict[str, str]]] = []
    for other in study.all_domains:
        if other == domain:
            continue
        for variant in (study.target, study.reference):
            pool += [row["messages"] for row in _rows(f"{other}_{variant}") if row["split"] == TRAIN]
    if n_rows is not None and n_rows > len(pool):
        warnings.warn(
            f"the KL set of {domain} asks for {n_rows} conversations, but the train splits of the other {study.name} domains hold "
            f"{len(pool)}: the KL set has all {len(pool)}",
            UserWarning,
            stacklevel=2,
        )
    if n_rows is None or n_rows >= len(pool):
        return pool
    return random.Random(seed).sample(pool, n_rows)


def kl_name(domain: str) -> str:
    """The built-in name of ``domain``'s default KL set (``kl:medical``), usable wherever a data source is."""
    study_of(domain)
    return f"kl:{domain}"


def default_kl_for(data: str) -> str | None:
    """The default KL set for training data named ``data`` (``medical_harmful[:train]`` → ``kl:medical``), if built in."""
    base = str(data).split(":", 1)[0]
    for study in STUDIES.values():
        for domain in study.all_domains:
            if base == f"{domain}_{study.target}":
                return kl_name(domain)
    return None
