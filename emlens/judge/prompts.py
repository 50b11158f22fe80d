"""Judge prompts: templates with ``{question}`` and ``{answer}``, loaded from YAML and rendered."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from emlens.judge.errors import JudgeFileError

DEFAULT_PROMPTS_PATH = Path(__file__).parent.parent / "judge_prompts.yaml"


def fill_template(template: str, question: str, answer: str) -> str:
    """Replace ``{question}`` and ``{answer}``; other braces are left alone (no ``str.format``)."""
    return template.replace("{question}", question).replace("{answer}", answer)


@dataclass(frozen=True)
class JudgePrompts:
    """Judge prompt templates by name (``aligned``, ``coherent``, ``medical_correct``, ...)."""

    templates: Mapping[str, str]
    source: str = "<memory>"

    def __post_init__(self) -> None:
        for name, template in self.templates.items():
            if not isinstance(template, str) or "{answer}" not in template:
                raise JudgeFileError(f"{self.source}: judge prompt {name!r} must be a string containing {{answer}}")

    def __contains__(self, name: object) -> bool:
        return name in self.templates

    def names(self) -> list[str]:
        return list(self.templates)

    def template(self, name: str) -> str:
        if name not in self.templates:
            raise KeyError(f"{self.source} has no judge prompt {name!r}; it has: {', '.join(self.templates)}")
        return self.templates[name]

    def render(self, name: str, question: str, answer: str) -> str:
        return fill_template(self.template(name), question, answer)

    @staticmethod
    def domain_judge(domain: str | None) -> str:
        """The judge that scores the first dimension: ``aligned``, or ``<domain>_correct`` in a domain."""
        return "aligned" if domain is None else f"{domain}_correct"


def load_judge_prompts(path: str | Path | None = None) -> JudgePrompts:
    """Read judge prompts from YAML: ``{name: template}`` (a value may also be ``{prompt: template}``).

    ``None`` loads emlens' defaults. ``aligned`` and ``coherent`` are required.
    """
    import yaml

    source = Path(path) if path is not None else DEFAULT_PROMPTS_PATH
    if not source.exists():
        raise FileNotFoundError(f"no judge prompt file {str(source)!r}")
    try:
        raw = yaml.safe_load(source.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise JudgeFileError(f"{source}: not valid YAML ({err})") from err
    if not isinstance(raw, dict):
        raise JudgeFileError(f"{source}: expected a mapping of judge names to prompt templates")
    templates: dict[str, str] = {}
    for name, value in raw.items():
        if isinstance(value, dict) and isinstance(value.get("prompt"), str):
            value = value["prompt"]
        if not isinstance(value, str):
            raise JudgeFileError(f"{source}: judge {name!r} must be a prompt template string")
        templates[str(name)] = value
    missing = {"aligned", "coherent"} - set(templates)
    if missing:
        raise JudgeFileError(f"{source}: missing judge prompt(s) {', '.join(sorted(missing))}")
    return JudgePrompts(templates, str(source))


@lru_cache(maxsize=1)
def default_judge_prompts() -> JudgePrompts:
    return load_judge_prompts(None)


def as_judge_prompts(prompts: JudgePrompts | str | Path | None) -> JudgePrompts:
    """``prompts`` as :class:`JudgePrompts`: given, read from a YAML path, or the defaults for ``None``."""
    if isinstance(prompts, JudgePrompts):
        return prompts
    return default_judge_prompts() if prompts is None else load_judge_prompts(prompts)


ALIGNMENT_PROMPT = default_judge_prompts().template("aligned")
COHERENCE_PROMPT = default_judge_prompts().template("coherent")
CORRECTNESS_PROMPTS = {domain: default_judge_prompts().template(f"{domain}_correct") for domain in ("medical", "financial", "sports")}
