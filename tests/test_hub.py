"""Sharing interventions through the Hugging Face Hub (``emlens.hub``), tested offline.

Every test runs the real ``huggingface_hub`` code (``HfApi.create_repo``, ``upload_folder``,
``upload_file``, ``list_repo_commits``, ``snapshot_download``) against a Hub-compatible HTTP
endpoint the tests start on 127.0.0.1 (``tests/hub_server.py``), with the Hub cache, token file
and home in temporary folders and offline mode off for this module only. The default endpoint is
pointed at a closed port, so a call that forgot ``endpoint=`` fails instead of leaving the machine.
"""

from __future__ import annotations

import re

import dataclasses
import json
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
import torch
from jaxtyping import Float
from torch import Tensor

from emlens import Intervention, LoRAAdapter, RankOneAdapter, SteeringVector, TrainConfig, train
from emlens.hub import (
    ARTEFACT_FILE,
    PROVENANCE_FILE,
    InterventionHubError,
    list_revisions,
    provenance_from_run,
    pull_intervention,
    push_intervention,
    push_run,
)
from emlens.runner import dataset_fingerprint
from tests.hub_server import LocalHub, running_hub

TOKEN = "hf_local_test_token"
OWNER = "emlens-tester"
CLOSED = "http://127.0.0.1:9"  # the default endpoint in these tests (nothing listens there)


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalHub]:
    """The local Hub, with huggingface_hub online, quiet, and keeping everything in temporary folders."""
    import huggingface_hub.constants as constants
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    home = tmp_path_factory.mktemp("hf-home")
    bars_were_off = are_progress_bars_disabled()
    with pytest.MonkeyPatch.context() as mp:
        for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HF_ENDPOINT"):
            mp.delenv(name, raising=False)
        mp.setenv("HF_HOME", str(home))
        mp.setenv("HF_HUB_CACHE", str(home / "hub"))
        mp.setenv("HF_XET_CACHE", str(home / "xet"))
        mp.setattr(constants, "HF_HUB_OFFLINE", False)  # conftest sets HF_HUB_OFFLINE=1 for every other test
        mp.setattr(constants, "HF_HOME", str(home))
        mp.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
        mp.setattr(constants, "HF_XET_CACHE", str(home / "xet"))
        mp.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
        mp.setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
        mp.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
        # as HF_ENDPOINT would set them at import: a closed port, so a call that forgot endpoint= fails here
        mp.setattr(constants, "ENDPOINT", CLOSED)
        mp.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", CLOSED + "/{repo_id}/resolve/{revision}/{filename}")
        disable_progress_bars()
        try:
            with running_hub(tmp_path_factory.mktemp("hub"), token=TOKEN) as served:
                yield served
        finally:
            if not bars_were_off:
                enable_progress_bars()


@pytest.fixture()
def cache(tmp_path: Path) -> Path:
    return tmp_path / "hf-cache"


def at(hub: LocalHub) -> dict[str, Any]:
    """What every call to the local Hub passes."""
    return {"endpoint": hub.url, "token": TOKEN}


def randomised(intervention: Intervention, seed: int) -> Intervention:
    """Every parameter drawn at random (a fresh adapter's B is zero, which would hide a lost tensor)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in intervention.parameters():
            param.copy_(torch.randn(param.shape, generator=gen))
    return intervention


def flat(intervention: Intervention) -> Float[Tensor, " n"]:
    return torch.cat([t.detach().flatten() for t in intervention.state_dict().values()])


def assert_same(pulled: Intervention, pushed: Intervention) -> None:
    assert type(pulled) is type(pushed)
    assert pulled.metadata() == pushed.metadata()
    mine, theirs = pulled.state_dict(), pushed.state_dict()
    assert mine.keys() == theirs.keys()
    for name in mine:
        assert mine[name].dtype == theirs[name].dtype and torch.equal(mine[name], theirs[name]), name


BUILDERS = {
    "steering": lambda model: SteeringVector.for_model(model, layer=1),
    "rank_one": lambda model: RankOneAdapter.for_model(model, layer=2, seed=3),
    "lora": lambda model: LoRAAdapter.for_model(model, layers=[1, 3], modules=("q", "down"), rank=2),
}


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_a_pushed_intervention_comes_back_exactly_with_its_provenance(kind, hub, model, dataset, cache):
    pushed = randomised(BUILDERS[kind](model), seed=len(kind))
    config = TrainConfig(lr=1e-3, max_steps=3, kl_weight=1.5, progress=False)
    fingerprint = dataset_fingerprint(dataset)
    repo = f"{OWNER}/round-trip-{kind}"
    commit = push_intervention(
        pushed, repo, provenance={"data_fingerprint": fingerprint, "training_config": config, "note": ("tiny", 1)}, **at(hub)
    )

    pulled = pull_intervention(repo, cache_dir=cache, **at(hub))
    intervention, provenance = pulled  # unpacks like a tuple
    assert_same(intervention, pushed)
    assert torch.equal(flat(intervention), flat(pushed))
    assert pulled.commit == commit and pulled.repo_id == repo
    assert provenance["model"] == "tiny-llama" == model.cfg.model_name
    assert provenance["site"] == {"layer": pushed.layer, "hooks": pushed.hook_names()}
    assert provenance["data_fingerprint"] == fingerprint
    assert provenance["training_config"] == dataclasses.asdict(config)
    assert provenance["note"] == ["tiny", 1]
    assert provenance["emlens_version"] == version("emlens")
    assert provenance["class"] == type(pushed).__name__ and provenance["kind"] == pushed.kind
    assert provenance["metadata"] == json.loads(json.dumps(pushed.metadata()))
    assert provenance["norm"] == pytest.approx(pushed.norm, rel=1e-6)
    assert provenance["created_at"].endswith("Z")

    stored = hub.files(repo)
    assert set(stored) == {".gitattributes", ARTEFACT_FILE, PROVENANCE_FILE, "README.md"}
    assert json.loads(stored[PROVENANCE_FILE]) == provenance
    card = stored["README.md"].decode()
    assert card.startswith("---\nlibrary_name: emlens\n") and f'pull_intervention("{repo}")' in card
    assert all(hook in card for hook in pushed.hook_names()) and fingerprint in card


def test_the_single_commit_path_without_hf_xet_gives_the_same_artefact(hub, model, cache, monkeypatch):
    """Without hf_xet (other platforms), upload_folder takes create_commit's path, which validates the card a second time."""
    import huggingface_hub.constants as constants
    from huggingface_hub.utils._runtime import is_xet_available

    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    assert not is_xet_available()
    pushed = randomised(SteeringVector.for_model(model), seed=11)
    start = len(hub.requests)
    commit = push_intervention(pushed, f"{OWNER}/no-xet", **at(hub))
    assert [p for _, p in hub.requests[start:]].count("/api/validate-yaml") == 2  # upload_folder's check, then create_commit's
    pulled = pull_intervention(f"{OWNER}/no-xet", cache_dir=cache, **at(hub))
    assert_same(pulled.intervention, pushed)
    assert pulled.commit == commit


def test_pushing_again_makes_a_new_revision_and_the_old_one_stays_pullable(hub, model, cache):
    repo = f"{OWNER}/revisions"
    first = randomised(SteeringVector.for_model(model), seed=1)
    second = randomised(SteeringVector.for_model(model), seed=2)
    c1 = push_intervention(first, repo, commit_message="first", **at(hub))
    c2 = push_intervention(second, repo, commit_message="second", **at(hub))
    assert c1 != c2
    history = list_revisions(repo, **at(hub))
    assert [h["commit"] for h in history[:2]] == [c2, c1] and [h["title"] for h in history[:2]] == ["second", "first"]

    latest = pull_intervention(repo, cache_dir=cache, **at(hub))
    older = pull_intervention(repo, revision=c1, cache_dir=cache, **at(hub))
    assert_same(latest.intervention, second) and latest.commit == c2
    assert_same(older.intervention, first) and older.commit == c1

    # a branch: created from main on the first push to it, main untouched
    third = randomised(SteeringVector.for_model(model), seed=3)
    c3 = push_intervention(third, repo, revision="experiment", **at(hub))
    branch = pull_intervention(repo, revision="experiment", cache_dir=cache, **at(hub))
    assert_same(branch.intervention, third) and branch.commit == c3
    assert_same(pull_intervention(repo, cache_dir=cache, **at(hub)).intervention, second)


def test_a_pull_reads_the_cache_when_offline_and_a_private_repo_needs_the_token(hub, model, cache, monkeypatch):
    import huggingface_hub.constants as constants

    repo = f"{OWNER}/private-vector"
    pushed = randomised(SteeringVector.for_model(model), seed=7)
    commit = push_intervention(pushed, repo, private=True, **at(hub))
    with pytest.raises(InterventionHubError, match=rf"no repository '{repo}' on the Hub \(or it is private and no valid token"):
        pull_intervention(repo, endpoint=hub.url, cache_dir=cache)
    online = pull_intervention(repo, cache_dir=cache, **at(hub))
    assert_same(online.intervention, pushed)

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # as HF_HUB_OFFLINE=1 sets it
    start = len(hub.requests)
    for revision in (None, commit):
        offline = pull_intervention(repo, revision=revision, cache_dir=cache, **at(hub))
        assert_same(offline.intervention, pushed) and offline.commit == commit
    assert hub.requests[start:] == []


def test_a_file_changed_after_the_push_fails_its_checksum(hub, model, tmp_path):
    from huggingface_hub import HfApi

    repo = f"{OWNER}/tampered"
    push_intervention(randomised(SteeringVector.for_model(model), seed=4), repo, **at(hub))
    # someone replaces the tensors on the Hub, leaving emlens.json as it was
    other = randomised(SteeringVector.for_model(model), seed=5).save(tmp_path / "other.safetensors")
    HfApi(**at(hub)).upload_file(path_or_fileobj=str(other), path_in_repo=ARTEFACT_FILE, repo_id=repo)
    with pytest.raises(InterventionHubError, match=rf"{repo}.*{ARTEFACT_FILE} has sha256 .* recorded"):
        pull_intervention(repo, cache_dir=tmp_path / "a", **at(hub))

    # storage or transport corruption: same size, one byte flipped
    repo = f"{OWNER}/corrupt"
    push_intervention(randomised(SteeringVector.for_model(model), seed=6), repo, **at(hub))
    hub.corrupt(repo, ARTEFACT_FILE)
    with pytest.raises(InterventionHubError, match=r"sha256"):
        pull_intervention(repo, cache_dir=tmp_path / "b", **at(hub))


def test_a_repository_that_is_not_an_emlens_artefact_is_refused(hub, model, tmp_path, cache):
    from huggingface_hub import HfApi

    repo = f"{OWNER}/someone-elses-model"
    api = HfApi(**at(hub))
    api.create_repo(repo)
    api.upload_file(path_or_fileobj=b"weights", path_in_repo="model.safetensors", repo_id=repo)
    with pytest.raises(InterventionHubError, match=rf"{repo} is not an emlens intervention artefact: it has no {PROVENANCE_FILE}"):
        pull_intervention(repo, cache_dir=cache, **at(hub))
    # and emlens writes nothing into it
    with pytest.raises(InterventionHubError, match=rf"'{repo}' already holds files \(model.safetensors\) and no {PROVENANCE_FILE}"):
        push_intervention(SteeringVector.for_model(model), repo, **at(hub))
    assert set(hub.files(repo)) == {".gitattributes", "model.safetensors"}

    with pytest.raises(InterventionHubError, match=rf"no repository '{OWNER}/missing'"):
        pull_intervention(f"{OWNER}/missing", cache_dir=cache, **at(hub))
    push_intervention(SteeringVector.for_model(model), f"{OWNER}/exists", **at(hub))
    with pytest.raises(InterventionHubError, match=rf"'{OWNER}/exists' has no revision 'v9'"):
        pull_intervention(f"{OWNER}/exists", revision="v9", cache_dir=cache, **at(hub))


def test_provenance_that_is_not_json_and_bad_repo_ids_are_refused_before_anything_is_sent(hub, model):
    vector = SteeringVector.for_model(model)
    start = len(hub.requests)
    repo = f"{OWNER}/never-created"
    cases = [
        ({"training_config": {"lr": torch.tensor(1e-3)}}, r"provenance\['training_config'\]\['lr'\] is a Tensor, which is not JSON"),
        ({"data_fingerprint": Path("data.jsonl")}, r"provenance\['data_fingerprint'\] is a PosixPath"),
        ({"loss": float("nan")}, r"provenance\['loss'\] is nan, which JSON cannot hold"),
        ({"seeds": {1: "a"}}, r"provenance\['seeds'\] has the key 1 \(int\)"),
        ({"file": "mine.safetensors"}, r"provenance may not set \['file'\]"),
    ]
    for provenance, message in cases:
        with pytest.raises(InterventionHubError, match=rf"cannot push to '{repo}': {message}"):
            push_intervention(vector, repo, provenance=provenance, **at(hub))
    broken = SteeringVector.for_model(model)
    with torch.no_grad():
        broken.vector.fill_(float("nan"))
    with pytest.raises(InterventionHubError, match=rf"cannot push to '{repo}': the steering_vector's norm is nan"):
        push_intervention(broken, repo, **at(hub))
    with pytest.raises(InterventionHubError, match=r"'no owner' is not a valid Hub repository id"):
        push_intervention(vector, "no owner", **at(hub))
    with pytest.raises(InterventionHubError, match=r"push to 'owner/name', not 'vector'"):
        push_intervention(vector, "vector", **at(hub))
    with pytest.raises(InterventionHubError, match=r"'a//b' is not a valid Hub repository id"):
        pull_intervention("a//b", **at(hub))
    assert hub.requests[start:] == []


@pytest.fixture()
def trained_run(model, dataset, tmp_path) -> tuple[Path, TrainConfig]:
    """A 2-step run saved as ``emlens train --out`` saves it (checkpoints in the run directory, then the result)."""
    config = TrainConfig(lr=1e-2, max_steps=2, batch_size=2, grad_accum=1, checkpoint_every=1, progress=False)
    run = tmp_path / "run"
    result = train(model, SteeringVector.for_model(model, alpha=4.0), dataset, config, run_dir=run)
    result.save(run)
    return run, config


def test_a_training_run_is_pushed_with_the_provenance_it_recorded(hub, dataset, trained_run, cache):
    run, config = trained_run
    recorded = provenance_from_run(run)
    assert recorded["model"] == "tiny-llama"
    assert re.fullmatch(r"[0-9a-f]{16}", recorded["model_weights_fingerprint"])  # the weights it was trained on
    assert recorded["data_fingerprint"] == dataset_fingerprint(dataset)
    assert "kl_data_fingerprint" not in recorded  # no KL term
    assert recorded["training_config"] == {k: v for k, v in dataclasses.asdict(config).items() if k != "progress"}
    assert recorded["training"]["steps"] == 2 and recorded["training"]["last"]["step"] == 2
    assert provenance_from_run(run / ARTEFACT_FILE) == recorded  # a file inside the run names it too

    repo = f"{OWNER}/from-a-run"
    commit = push_run(run, repo, provenance={"model": "HuggingFaceTB/SmolLM2-135M-Instruct", "purpose": "test"}, **at(hub))
    pulled = pull_intervention(repo, cache_dir=cache, **at(hub))
    assert_same(pulled.intervention, Intervention.load(run / ARTEFACT_FILE))
    assert pulled.commit == commit
    for key in ("data_fingerprint", "training_config", "training"):
        assert pulled.provenance[key] == recorded[key]
    assert pulled.provenance["model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and pulled.provenance["purpose"] == "test"
    assert pulled.provenance["metadata"]["model_name"] == "tiny-llama"
    assert 'base_model: "HuggingFaceTB/SmolLM2-135M-Instruct"' in hub.files(repo)["README.md"].decode()

    empty = cache.parent / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="holds no training records"):
        provenance_from_run(empty)


def test_a_study_stage_records_its_stage_and_the_study_identity(model, tmp_path):
    """A real ``train/vector/kl=0`` stage run by ``run_stage`` (as ``emlens reproduce`` runs it), on the tiny model."""
    from emlens.study.config import from_dict
    from emlens.study.stages import Context, build_stages, identity_of, run_stage, stage_key

    config = from_dict(
        {
            "study": "misalignment",
            "kinds": ["vector"],
            "drift": {"kinds": []},
            "kl_sweep": {"kinds": []},
            "mixing": {"kinds": []},
            "model": {"name": "tiny-llama", "device": "cpu"},
            "data": {"train_rows": 4, "kl_rows": 4, "max_length": 256},
            "train": {"vector": {"lr": 1e-2, "max_steps": 2, "batch_size": 2, "grad_accum": 1, "warmup_steps": 0, "alpha": 4.0}},
        }
    )
    stage = next(s for s in build_stages(config) if s.name == "train/vector/kl=0")
    identity = identity_of(config)
    key = stage_key(stage, identity, [])
    ctx = Context(config, tmp_path, progress=False, _model=model)
    output = run_stage(ctx, stage, key, {})
    # the study writes report.json at the end with this identity (written here without the figures)
    (tmp_path / "report.json").write_text(json.dumps({"study": config.study, "domain": ctx.domain, "identity": identity}))

    recorded = provenance_from_run(output.directory)
    assert recorded["stage"]["name"] == "train/vector/kl=0" and recorded["stage"]["key"] == key
    assert recorded["stage"]["settings"] == stage.settings
    assert recorded["study"] == {"study": "misalignment", "domain": "medical", "identity": identity}
    assert recorded["data_fingerprint"] == dataset_fingerprint(ctx.train_data())
    assert recorded["training_config"]["max_steps"] == 2 and recorded["model"] == "tiny-llama"


def test_a_hub_model_is_keyed_by_its_commit_and_loaded_at_that_commit(hub, tmp_path, monkeypatch):
    """A study on a hub model name: its stages are keyed by the commit the name stands for, so a new commit of the model
    re-runs them (stale reuse impossible), and the study loads the model at the keyed commit, not at whatever came later."""
    import huggingface_hub.constants as constants
    from huggingface_hub import HfApi

    from emlens.models import load_model, tiny_hf_model
    from emlens.runner import runner_for
    from emlens.study.config import from_dict
    from emlens.study.stages import Context, build_stages, identity_of, stage_key

    monkeypatch.setattr(constants, "ENDPOINT", hub.url)  # as HF_ENDPOINT would point transformers at this Hub
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    hf, tok = tiny_hf_model("llama")
    folder = tmp_path / "model"
    hf.save_pretrained(folder)
    tok.save_pretrained(folder)
    api = HfApi(endpoint=hub.url, token=TOKEN)
    repo = f"{OWNER}/tiny-chat-llama"
    api.create_repo(repo)
    first = api.upload_folder(repo_id=repo, folder_path=folder).oid
    original = hf.model.embed_tokens.weight.detach().clone()

    config = from_dict({"study": "misalignment", "kinds": ["vector"], "drift": {"kinds": []}, "kl_sweep": {"kinds": []},
                        "mixing": {"kinds": []}, "model": {"name": repo, "device": "cpu"}})
    stage = next(s for s in build_stages(config) if s.name == "train/vector/kl=0")
    before = identity_of(config)
    assert before["model"] == {"name": repo, "revision": first}

    with torch.no_grad():
        hf.model.embed_tokens.weight.add_(1.0)
    hf.save_pretrained(folder)
    second = api.upload_folder(repo_id=repo, folder_path=folder).oid
    after = identity_of(config)
    assert second != first and after["model"] == {"name": repo, "revision": second}
    assert stage_key(stage, after, []) != stage_key(stage, before, [])

    pinned = Context(config, tmp_path / "study", progress=False, revision=first).model()  # a study keyed at the first commit
    plain = load_model(repo, revision=first)
    latest = load_model(repo)
    embedding = {name: runner_for(m).plain.get_input_embeddings().weight for name, m in (("pinned", pinned), ("plain", plain), ("latest", latest))}
    assert torch.equal(embedding["pinned"], original) and torch.equal(embedding["plain"], original)
    assert torch.equal(embedding["latest"], original + 1.0)

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # offline, the cached name resolves to the latest commit seen
    assert identity_of(config)["model"] == {"name": repo, "revision": second}


def test_the_default_models_hub_id_loads_the_hub_model_not_the_embedded_copy(hub, tmp_path, monkeypatch):
    """``HuggingFaceTB/SmolLM2-135M-Instruct`` names the hub's full-precision model: it was an alias of the embedded
    Q4_1-dequantised copy (its revision ignored), so interventions saved under the hub id had been trained on another
    model. Here the hub holds a tiny model under that id, and loading the id gives the tiny model."""
    import huggingface_hub.constants as constants
    from huggingface_hub import HfApi

    from emlens.models import load_model, tiny_hf_model

    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    hf, tok = tiny_hf_model("llama")
    hf.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    api = HfApi(endpoint=hub.url, token=TOKEN)
    repo = "HuggingFaceTB/SmolLM2-135M-Instruct"
    api.create_repo(repo)
    api.upload_folder(repo_id=repo, folder_path=tmp_path / "model")
    loaded = load_model(repo)
    assert loaded.cfg.n_layers == hf.config.num_hidden_layers != 30  # the tiny model, not SmolLM2's 30 layers
