"""Share interventions through the Hugging Face Hub: :func:`push_intervention` and :func:`pull_intervention`.

An emlens artefact is a model repository holding three files:

* ``intervention.safetensors``: the intervention, exactly as :meth:`Intervention.save` writes it
  (its tensors and its JSON metadata: kind, layer, hooks, dims, model name);
* ``emlens.json``: the provenance: the emlens version, the intervention's class, kind, metadata,
  site (layer and hook names) and norm, the file's sha256 and size, a UTC timestamp, the model,
  and whatever the caller adds (data fingerprint, training config, ...);
  :func:`provenance_from_run` reads those from a saved training run or study stage;
* ``README.md``: a short model card saying what it is and how to load it.

:func:`pull_intervention` downloads a revision, refuses a repository that is not an emlens artefact
and a file whose sha256 is not the one recorded at push time, and loads the intervention.
``huggingface_hub`` is imported inside the functions only: importing this module touches no network.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from emlens.interventions import Intervention

ARTEFACT_FILE = "intervention.safetensors"
PROVENANCE_FILE = "emlens.json"
CARD_FILE = "README.md"
FORMAT = "emlens-intervention"
FORMAT_VERSION = 1
# what emlens writes into emlens.json itself; a caller's provenance may add keys, and may set "model", but not these
RESERVED_KEYS = frozenset({"format", "format_version", "emlens_version", "created_at", "class", "kind", "site", "norm", "metadata", "file"})
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_SHA = re.compile(r"^[0-9a-f]{40}$")


class InterventionHubError(ValueError):
    """A repository is not an emlens artefact, its file fails its checksum, or what was asked for cannot be pushed."""


@dataclass(frozen=True)
class PulledIntervention:
    """What :func:`pull_intervention` returns; unpacks as ``intervention, provenance = pull_intervention(...)``."""

    intervention: Intervention
    provenance: dict[str, Any]
    repo_id: str
    commit: str  # the commit the files came from (pass it as ``revision=`` to get exactly these files again)
    path: Path  # the local folder holding the downloaded files

    def __iter__(self) -> Iterator[Any]:
        yield self.intervention
        yield self.provenance


def emlens_version() -> str:
    """The installed emlens version (``"source"`` for a source tree that was not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("emlens")
    except PackageNotFoundError:  # pragma: no cover - a source tree that was not installed
        return "source"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _plain(value: Any, where: str) -> Any:
    """``value`` as plain JSON (dataclasses become dicts, tuples lists); anything else is refused, naming where it is."""
    if value is None or isinstance(value, (bool, str, int)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InterventionHubError(f"{where} is {value}, which JSON cannot hold; pass a finite number or None")
        return value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _plain(dataclasses.asdict(value), where)
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise InterventionHubError(f"{where} has the key {key!r} ({type(key).__name__}); JSON object keys must be strings")
            out[key] = _plain(item, f"{where}[{key!r}]")
        return out
    if isinstance(value, (list, tuple)):
        return [_plain(item, f"{where}[{i}]") for i, item in enumerate(value)]
    raise InterventionHubError(
        f"{where} is a {type(value).__name__}, which is not JSON-serialisable; pass numbers, strings, lists, dicts or "
        "dataclasses of them (e.g. tensor.tolist(), str(path))"
    )


def _check_repo_id(repo_id: str, *, pushing: bool) -> None:
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except ValueError as err:
        raise InterventionHubError(f"{repo_id!r} is not a valid Hub repository id ({err})") from err
    if pushing and "/" not in repo_id:
        raise InterventionHubError(f"push to 'owner/name', not {repo_id!r}: the owner is your user name or an organisation")


def _looks_like_hub_id(name: str) -> bool:
    return bool(_HUB_ID.match(name)) and not Path(name).exists()


def build_provenance(intervention: Intervention, file: str | Path, provenance: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The ``emlens.json`` record of ``intervention`` saved at ``file``, with the caller's ``provenance`` merged in.

    The caller may set ``model`` (e.g. the Hub id of the base model) and add any key except
    :data:`RESERVED_KEYS`; values must be JSON-serialisable (dataclasses such as a ``TrainConfig``
    become dicts), or :class:`InterventionHubError` names the offending entry.
    """
    extra = _plain(dict(provenance or {}), "provenance")
    taken = sorted(RESERVED_KEYS & set(extra))
    if taken:
        raise InterventionHubError(f"provenance may not set {taken}: emlens writes those itself (reserved: {sorted(RESERVED_KEYS)})")
    norm = float(intervention.norm)
    if not math.isfinite(norm):
        raise InterventionHubError(f"the {intervention.kind}'s norm is {norm}: it holds NaN or infinite values, refusing to share it")
    metadata = _plain(intervention.metadata(), "metadata()")
    file = Path(file)
    model = extra.pop("model", None) or metadata.get("model_name")
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "emlens_version": emlens_version(),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "class": type(intervention).__name__,
        "kind": intervention.kind,
        "model": model,
        "site": {"layer": intervention.layer, "hooks": list(intervention.hook_names())},
        "norm": norm,
        "metadata": metadata,
        "file": {"name": file.name, "sha256": _sha256(file), "size": file.stat().st_size},
        **extra,
    }


def model_card(repo_id: str, record: Mapping[str, Any]) -> str:
    """The ``README.md`` pushed beside an intervention: what it is, where it acts, its provenance and how to load it."""
    model = record.get("model")
    kind = str(record["kind"])
    front = ["---", "library_name: emlens", "tags:", "- emlens", f"- {kind.replace('_', '-')}", "- interpretability"]
    if isinstance(model, str) and _looks_like_hub_id(model):
        front.append(f"base_model: {json.dumps(model)}")
    front.append("---")
    hooks = ", ".join(f"`{h}`" for h in record["site"]["hooks"])
    rows = [
        ("kind", f"`{record['class']}` (`{kind}`)"),
        ("model", f"`{model}`" if model else "not recorded"),
        ("layer", str(record["site"]["layer"])),
        ("hooks", hooks),
        ("norm", f"{record['norm']:.6g}"),
        ("data fingerprint", f"`{record['data_fingerprint']}`" if record.get("data_fingerprint") else "not recorded"),
        ("emlens version", f"`{record['emlens_version']}`"),
        ("sha256 of the file", f"`{record['file']['sha256']}`"),
        ("pushed at", str(record["created_at"])),
    ]
    body = [
        "",
        f"# {repo_id.rpartition('/')[2]}",
        "",
        f"An emlens `{record['class']}`: an edit of the forward pass of `{model or 'its model'}` "
        f"through TransformerLens hooks, saved as `{record['file']['name']}` (safetensors with its settings as JSON metadata). "
        f"`{PROVENANCE_FILE}` holds its full provenance.",
        "",
        "| | |",
        "| --- | --- |",
        *[f"| {name} | {value} |" for name, value in rows],
        "",
    ]
    if record.get("training_config") is not None:
        body += ["Training config:", "", "```json", json.dumps(record["training_config"], indent=2), "```", ""]
    load_name = json.dumps(model) if model else '"MODEL"'
    body += [
        "## Load it",
        "",
        "```python",
        "from emlens import load_model",
        "from emlens.hub import pull_intervention",
        "",
        f'intervention, provenance = pull_intervention("{repo_id}")  # revision="<commit sha>" pins one version',
        f"model = load_model({load_name})",
        "with intervention.applied(model):",
        "    logits = model(input_ids)",
        "```",
        "",
        "`pull_intervention` checks the file's sha256 against the one recorded at push time before loading it.",
        "",
    ]
    return "\n".join(front + body)


def push_intervention(
    intervention: Intervention,
    repo_id: str,
    *,
    provenance: Mapping[str, Any] | None = None,
    token: str | bool | None = None,
    endpoint: str | None = None,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
) -> str:
    """Push ``intervention`` to the Hub model repository ``repo_id`` (created if missing); returns the commit sha.

    Uploads ``intervention.safetensors``, ``emlens.json`` (:func:`build_provenance`, with
    ``provenance`` merged in: e.g. ``provenance_from_run(run_dir)``, or ``{"model": ...,
    "data_fingerprint": ..., "training_config": ...}``) and a generated ``README.md`` in one
    commit. ``revision`` is the branch to commit to (created from ``main`` when missing);
    ``endpoint`` another Hub-compatible server (default: ``HF_ENDPOINT`` or huggingface.co);
    ``token`` as in ``huggingface_hub``. A repository that already holds files but no
    ``emlens.json`` is refused (it is not an emlens artefact: nothing there is overwritten).
    """
    if not isinstance(intervention, Intervention):
        raise TypeError(f"push_intervention needs an emlens Intervention, got {type(intervention).__name__}")
    _check_repo_id(repo_id, pushing=True)
    from huggingface_hub import HfApi

    with tempfile.TemporaryDirectory(prefix="emlens-hub-") as tmp:
        folder = Path(tmp)
        file = intervention.save(folder / ARTEFACT_FILE)
        try:
            record = build_provenance(intervention, file, provenance)
        except InterventionHubError as err:
            raise InterventionHubError(f"cannot push to {repo_id!r}: {err}") from None
        (folder / PROVENANCE_FILE).write_text(json.dumps(record, indent=2, allow_nan=False) + "\n", encoding="utf-8")
        (folder / CARD_FILE).write_text(model_card(repo_id, record), encoding="utf-8")

        api = HfApi(endpoint=endpoint, token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision is not None and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        present = set(api.list_repo_files(repo_id, revision=revision)) - {".gitattributes"}
        if present and PROVENANCE_FILE not in present:
            raise InterventionHubError(
                f"{repo_id!r} already holds files ({', '.join(sorted(present)[:5])}) and no {PROVENANCE_FILE}: it is not an emlens "
                "artefact, so emlens will not write into it; push to a new repository"
            )
        message = commit_message or f"Upload {type(intervention).__name__} with emlens {record['emlens_version']}"
        info = api.upload_folder(repo_id=repo_id, folder_path=folder, revision=revision, commit_message=message)
    return str(info.oid)


def pull_intervention(
    repo_id: str,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    endpoint: str | None = None,
    cache_dir: str | Path | None = None,
    device: str | torch.device = "cpu",
) -> PulledIntervention:
    """Download and load the intervention in ``repo_id`` at ``revision`` (a branch, tag or commit sha; default ``main``).

    Returns a :class:`PulledIntervention` (``intervention, provenance = pull_intervention(...)``
    works). Raises :class:`InterventionHubError` when the repository or revision does not exist,
    when it holds no ``emlens.json`` (not an emlens artefact), or when the downloaded file's
    sha256 differs from the one ``emlens.json`` recorded at push time. Files are cached by
    ``huggingface_hub`` (``cache_dir``, else ``HF_HUB_CACHE``), so a later pull of the same
    commit, or one with ``HF_HUB_OFFLINE=1``, reads the cache.
    """
    _check_repo_id(repo_id, pushing=False)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    where = repo_id if revision is None else f"{repo_id} (revision {revision})"
    try:
        folder = Path(
            snapshot_download(
                repo_id,
                revision=revision,
                token=token,
                endpoint=endpoint,
                cache_dir=cache_dir,
                allow_patterns=[ARTEFACT_FILE, PROVENANCE_FILE, CARD_FILE],
            )
        )
    except GatedRepoError as err:
        raise InterventionHubError(f"{repo_id!r} is gated: accept its terms on the Hub and pass a token") from err
    except RepositoryNotFoundError as err:
        raise InterventionHubError(f"no repository {repo_id!r} on the Hub (or it is private and no valid token was given)") from err
    except RevisionNotFoundError as err:
        raise InterventionHubError(f"{repo_id!r} has no revision {revision!r}") from err

    record_path = folder / PROVENANCE_FILE
    if not record_path.is_file():
        raise InterventionHubError(
            f"{where} is not an emlens intervention artefact: it has no {PROVENANCE_FILE} (emlens.hub.push_intervention writes one)"
        )
    record = _read_record(record_path, where)
    file = folder / ARTEFACT_FILE
    if not file.is_file():
        raise InterventionHubError(f"{where} has {PROVENANCE_FILE} but no {ARTEFACT_FILE}")
    expected, found = record["file"]["sha256"], _sha256(file)
    if found != expected:
        raise InterventionHubError(
            f"{where}: {ARTEFACT_FILE} has sha256 {found}, but {PROVENANCE_FILE} recorded {expected} when it was pushed; the file "
            "was changed afterwards or the download is corrupt, so it is not loaded"
        )
    intervention = Intervention.load(file, device=device)
    if _plain(intervention.metadata(), "metadata()") != record["metadata"]:
        raise InterventionHubError(f"{where}: the settings inside {ARTEFACT_FILE} differ from those in {PROVENANCE_FILE}")
    commit = folder.name if _SHA.match(folder.name) else str(revision or "main")
    return PulledIntervention(intervention, record, repo_id, commit, folder)


def _read_record(path: Path, where: str) -> dict[str, Any]:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise InterventionHubError(f"{where}: {PROVENANCE_FILE} is not readable JSON ({err})") from err
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise InterventionHubError(f"{where}: {PROVENANCE_FILE} is not an emlens provenance record (no 'format': {FORMAT!r})")
    version = record.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise InterventionHubError(
            f"{where}: {PROVENANCE_FILE} has format version {version!r}; this emlens reads up to {FORMAT_VERSION} (upgrade emlens)"
        )
    file = record.get("file")
    if not (isinstance(file, dict) and file.get("name") == ARTEFACT_FILE and isinstance(file.get("sha256"), str)):
        raise InterventionHubError(f"{where}: {PROVENANCE_FILE} does not record {ARTEFACT_FILE} and its sha256")
    if not isinstance(record.get("metadata"), dict):
        raise InterventionHubError(f"{where}: {PROVENANCE_FILE} lacks the intervention's metadata")
    return record


def list_revisions(
    repo_id: str, *, branch: str = "main", token: str | bool | None = None, endpoint: str | None = None
) -> list[dict[str, str]]:
    """The commits of ``branch`` in ``repo_id``, newest first: ``{"commit", "title", "date"}`` (pass a commit as ``revision=``)."""
    _check_repo_id(repo_id, pushing=False)
    from huggingface_hub import HfApi

    commits = HfApi(endpoint=endpoint, token=token).list_repo_commits(repo_id, revision=branch)
    return [{"commit": c.commit_id, "title": c.title, "date": c.created_at.isoformat()} for c in commits]


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise InterventionHubError(f"{path} cannot be read as JSON ({err})") from err


def provenance_from_run(path: str | Path) -> dict[str, Any]:
    """The training provenance a saved run records, ready for ``push_intervention(..., provenance=...)``.

    ``path`` is a run directory (``emlens train --out``, or :meth:`TrainingResult.save` plus
    ``train(run_dir=...)``), a study stage directory (``OUT/stages/train__…``), or a file inside
    one. Read: ``config.json`` (the ``TrainConfig``) → ``training_config``; the checkpoint's
    ``run.json`` (``checkpoint/`` or ``run/checkpoint/``) → ``model``, ``data_fingerprint`` and
    ``kl_data_fingerprint`` (sha256 of the token ids and loss masks trained on); ``losses.json`` →
    ``training`` (steps, last record); a stage's ``stage.json`` → ``stage`` (name, cache key,
    settings); the study's ``report.json`` → ``study`` (its identity: model, dtype, data, version).
    Records that are absent are left out; a directory with none of them raises.
    """
    directory = Path(path)
    if directory.is_file():
        directory = directory.parent
    if not directory.is_dir():
        raise FileNotFoundError(f"no run directory at {directory}")
    out: dict[str, Any] = {}
    config_path = directory / "config.json"
    if config_path.is_file():
        config = _read_json(config_path)
        if isinstance(config, dict):
            out["training_config"] = {k: v for k, v in config.items() if k != "progress"}  # display only
    for run_path in (directory / "checkpoint" / "run.json", directory / "run" / "checkpoint" / "run.json", directory / "run.json"):
        if run_path.is_file():
            run = _read_json(run_path)
            if isinstance(run, dict):
                model = run.get("model")
                if isinstance(model, dict):  # {"name", "weights"}: the name, and the fingerprint of the weights trained on
                    if model.get("weights") is not None:
                        out["model_weights_fingerprint"] = model["weights"]
                    model = model.get("name")
                if model is not None:
                    out["model"] = model
                if run.get("data") is not None:
                    out["data_fingerprint"] = run["data"]
                if run.get("kl_data") is not None:
                    out["kl_data_fingerprint"] = run["kl_data"]
                if "training_config" not in out and isinstance(run.get("config"), dict):
                    out["training_config"] = run["config"]
            break
    losses_path = directory / "losses.json"
    if losses_path.is_file():
        losses = _read_json(losses_path)
        if isinstance(losses, list) and losses:
            out["training"] = {"steps": len(losses), "last": losses[-1]}
    stage_path = directory / "stage.json"
    if stage_path.is_file():
        stage = _read_json(stage_path)
        if isinstance(stage, dict):
            out["stage"] = {k: stage[k] for k in ("name", "key", "settings", "finished") if k in stage}
            report_path = directory.parent.parent / "report.json"
            if directory.parent.name == "stages" and report_path.is_file():
                report = _read_json(report_path)
                if isinstance(report, dict):
                    out["study"] = {k: report[k] for k in ("study", "domain", "identity") if k in report}
    if not out:
        raise FileNotFoundError(
            f"{directory} holds no training records (looked for config.json, checkpoint/run.json, run/checkpoint/run.json, "
            "losses.json, stage.json)"
        )
    return _plain(out, f"the records in {directory}")


def push_run(
    path: str | Path,
    repo_id: str,
    *,
    provenance: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> str:
    """Push the ``intervention.safetensors`` of a saved run or study stage with :func:`provenance_from_run` (``provenance`` wins on a clash)."""
    directory = Path(path)
    file = directory / ARTEFACT_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{directory} has no {ARTEFACT_FILE}: not a finished training run")
    intervention = Intervention.load(file)
    merged = {**provenance_from_run(directory), **dict(provenance or {})}
    return push_intervention(intervention, repo_id, provenance=merged, **kwargs)
