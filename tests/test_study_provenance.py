"""The study's stage cache against stale numbers: what each stage's key holds, what a stage read from its upstream
stages (a re-run upstream stage with other output under the same key re-runs its readers), where each stage ran,
``--report-only`` on missing stages, and the data sizes the stages actually used.

A tiny random Llama (saved as a checkpoint) stands in for the model, as in ``test_study.py``.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest

from emlens.study import NothingToReport, StaleStageWarning, rewrite_report, run_study
from emlens.study.config import StudyConfig
from emlens.study.stages import SESSION, STAGE_FILE, build_stages, identity_of, stage_dir, stage_key
from tests.test_study import judged, vector_only

# the stages of vector_only() that read the general run train/vector/kl=0, and those that read the narrow one
READERS = ["efficiency/vector", "stability/vector", "pretraining_kl/vector", "preference/main"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from emlens.models import tiny_hf_model

    path = tmp_path_factory.mktemp("tiny-provenance")
    model, tokenizer = tiny_hf_model("llama", seed=5, n_layers=4, d_model=64)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def stored(tiny, tmp_path_factory):
    """A finished vector-only study (both training runs and their four readers); tests work on copies of it."""
    out = tmp_path_factory.mktemp("provenance-study")
    run = run_study(vector_only(tiny), out, progress=False, command="test")
    return out, run


def copy_of(stored, tmp_path: Path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(stored[0], copy)
    return copy


def keys_of(config: StudyConfig) -> dict[str, str]:
    identity, keys = identity_of(config), {}
    for stage in build_stages(config):
        keys[stage.name] = stage_key(stage, identity, [keys[d] for d in stage.deps])
    return keys


def test_the_bootstrap_of_the_technical_register_is_in_the_evaluation_stages_keys(tiny):
    """The technical-prose evaluation computes its register CIs with preference.bootstrap: a change re-keys those stages
    (and the preference stages, which read it too), never the training or measuring stages."""
    for study, readers in (("technical-prose", ("evaluation/", "preference/")), ("misalignment", ("preference/",))):
        before = keys_of(vector_only(tiny, study=study, evaluation=judged("local")))
        after = keys_of(vector_only(tiny, study=study, evaluation=judged("local"), preference={"bootstrap": 77}))
        assert set(before) == set(after) and any(n.startswith("evaluation/") for n in before)
        changed = {name for name in before if before[name] != after[name]}
        assert changed == {name for name in before if name.startswith(readers)}, study  # misalignment's evaluation reads no CI


def test_a_stage_records_what_it_read_and_where_it_ran(stored):
    from emlens.study.stages import output_digest

    out, run = stored
    meta = json.loads((stage_dir(out, "efficiency/vector") / STAGE_FILE).read_text())
    general, narrow = stage_dir(out, "train/vector/kl=0"), stage_dir(out, "train/vector/kl=6.6")
    assert meta["upstream"] == {"train/vector/kl=0": output_digest(general), "train/vector/kl=6.6": output_digest(narrow)}
    assert output_digest(general) != output_digest(narrow)
    env = meta["environment"]
    assert env["session"] == SESSION["id"] and env["device"] == "cpu" and env["hardware"]["cpu_cores"] >= 1
    assert {"torch", "transformers", "transformer-lens", "emlens"} <= set(env["versions"])
    report = json.loads((out / "report.json").read_text())
    for name, stage in report["stages"].items():
        assert stage["environment"]["session"] == SESSION["id"] and stage["finished_at"], name
    assert report["provenance"]["computed_here"] == list(run.outputs) and report["provenance"]["cached"] == []
    md = (out / "report.md").read_text()
    assert "| stage | time (s) | computed by | ran on | key |" in md and "cpu; " in md


def test_a_report_says_which_stages_came_from_other_sessions_machines_and_versions(stored, tmp_path, tiny):
    out = copy_of(stored, tmp_path)
    path = stage_dir(out, "train/vector/kl=0") / STAGE_FILE
    meta = json.loads(path.read_text())
    meta["environment"] = {
        **meta["environment"],
        "session": "elsewhere01",
        "device": "cuda:0 (NVIDIA H200)",
        "hardware": {"platform": "Linux-gpu", "cpu_cores": 16, "torch_threads": 16, "gpus": ["NVIDIA H200"]},
        "versions": {**meta["environment"]["versions"], "torch": "9.9.9"},
    }
    path.write_text(json.dumps(meta))  # stage.json is no part of what readers read: nothing goes stale
    run = run_study(vector_only(tiny), out, progress=False, command="resumed")
    assert run.ran == []
    report = json.loads((out / "report.json").read_text())
    prov = report["provenance"]
    assert prov["cached"] == list(run.outputs) and "elsewhere01" in prov["sessions"]
    assert len(prov["machines"]) == 2 and len(prov["package_versions"]) == 2
    assert report["stages"]["train/vector/kl=0"]["environment"]["device"] == "cuda:0 (NVIDIA H200)"
    md = (out / "report.md").read_text()
    assert f"{len(run.outputs)} of {len(run.outputs)} stages came from the cache" in md
    assert "computed by other sessions than this one" in md and "elsewhere01" in md
    assert "different devices or machines" in md and "different package versions" in md and "torch 9.9.9" in md
    assert "cache: session elsewhere01" in md and "cuda:0 (NVIDIA H200); NVIDIA H200" in md


def test_a_reader_of_an_upstream_stage_whose_output_changed_under_the_same_key_runs_again(stored, tmp_path, monkeypatch, tiny):
    """Keys name settings, not weights: a training stage re-run (or rewritten) under its key with other output re-runs
    the stages that read it; one that saves the same output again does not."""
    import torch

    from emlens import training
    from emlens.interventions import Intervention

    config = vector_only(tiny)
    out = copy_of(stored, tmp_path)
    # 1. the general run's weights rewritten in place, its stage.json (key, finished) untouched
    weights = stage_dir(out, "train/vector/kl=0") / "intervention.safetensors"
    vector = Intervention.load(weights)
    with torch.no_grad():
        for p in vector.parameters():
            p.add_(0.5)
    vector.save(weights)
    with pytest.warns(StaleStageWarning, match=r"train/vector/kl=0 holds another output than the one it read"):
        run = run_study(config, out, progress=False, command="test")
    assert sorted(run.ran) == sorted(READERS) and sorted(run.stale) == sorted(READERS)
    assert all("train/vector/kl=0" in reason for reason in run.stale.values())
    with warnings.catch_warnings():
        warnings.simplefilter("error", StaleStageWarning)
        assert run_study(config, out, progress=False, command="test").ran == []  # the new digests are recorded

    # 2. the narrow run's folder deleted and trained again under the same key, to other weights (GPU non-determinism)
    real_train = training.train

    def other_weights(*args, **kwargs):
        result = real_train(*args, **kwargs)
        with torch.no_grad():
            for p in result.intervention.parameters():
                p.mul_(1.5)
        return result

    monkeypatch.setattr(training, "train", other_weights)
    shutil.rmtree(stage_dir(out, "train/vector/kl=6.6"))
    with pytest.warns(StaleStageWarning, match=r"train/vector/kl=6.6 holds another output"):
        run = run_study(config, out, progress=False, command="test")
    assert sorted(run.ran) == sorted(["train/vector/kl=6.6", *READERS])
    meta = json.loads((stage_dir(out, "efficiency/vector") / STAGE_FILE).read_text())
    assert meta["upstream"]["train/vector/kl=6.6"] in run.stale["efficiency/vector"]  # it names the digest it now read

    # 3. deleted and trained again to the same output: its readers stay cached
    shutil.rmtree(stage_dir(out, "train/vector/kl=6.6"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", StaleStageWarning)
        run = run_study(config, out, progress=False, command="test")
    assert run.ran == ["train/vector/kl=6.6"] and set(READERS) <= set(run.cached)

    # 4. a reader interrupted while it read other upstream output: its partial work is cleared, not resumed
    folder = stage_dir(out, "efficiency/vector")
    meta = json.loads((folder / STAGE_FILE).read_text())
    (folder / STAGE_FILE).write_text(
        json.dumps({**meta, "finished": False, "upstream": {**meta["upstream"], "train/vector/kl=0": "0" * 32}})
    )
    (folder / "partial.jsonl").write_text("work done from the old weights\n")
    with pytest.warns(StaleStageWarning, match=r"efficiency/vector: the unfinished work .* is cleared"):
        run = run_study(config, out, progress=False, command="test")
    assert run.ran == ["efficiency/vector"] and not (folder / "partial.jsonl").exists()


def test_report_only_names_missing_stages_and_leaves_out_their_readers(stored, tmp_path, tiny):
    out = copy_of(stored, tmp_path)
    shutil.rmtree(stage_dir(out, "stability/vector"))
    shutil.rmtree(stage_dir(out, "train/vector/kl=6.6"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rewrite_report(vector_only(tiny), out, command="partial")
    text = " | ".join(str(w.message) for w in caught)
    assert "are not in" in text and "left out of the report: train/vector/kl=6.6, stability/vector" in text
    assert "computed from upstream outputs that are missing or have changed" in text
    for reader in ("efficiency/vector", "pretraining_kl/vector", "preference/main"):
        assert f"{reader} (its upstream stage train/vector/kl=6.6 is not reusable (not found))" in text
    report = json.loads((out / "report.json").read_text())
    assert set(report["stages"]) == {"train/vector/kl=0"}
    assert report["identity"]["left_out"] == [
        "train/vector/kl=6.6",
        "efficiency/vector",
        "stability/vector",
        "pretraining_kl/vector",
        "preference/main",
    ]


def test_report_only_with_no_matching_stage_raises_and_keeps_the_existing_report(stored, tmp_path, tiny):
    out = copy_of(stored, tmp_path)
    before = {name: (out / name).read_bytes() for name in ("report.json", "report.md")}
    figures = sorted(p.name for p in (out / "figures").iterdir())
    other = vector_only(tiny, seed=1)  # every key differs
    with pytest.raises(
        NothingToReport, match=r"no stage in .* finished under this config's settings .*nothing was written and the existing report is kept"
    ):
        rewrite_report(other, out)
    assert {name: (out / name).read_bytes() for name in before} == before
    assert sorted(p.name for p in (out / "figures").iterdir()) == figures
    empty = tmp_path / "empty"
    with pytest.raises(NothingToReport, match=rf"{len(build_stages(vector_only(tiny)))} not found"):
        rewrite_report(vector_only(tiny), empty)
    assert not empty.exists() or not any(empty.iterdir())


def test_emlens_reproduce_report_only_without_stages_is_one_line_and_exit_2(tmp_path, capsys, tiny):
    from emlens.cli import EXIT_USER_ERROR, main

    config = tmp_path / "study.toml"
    config.write_text(f'study = "misalignment"\nkinds = ["vector"]\n\n[model]\nname = "{tiny}"\ndevice = "cpu"\n\n[drift]\nkinds = []\n')
    out = tmp_path / "out"
    (out / "report.md").parent.mkdir()
    (out / "report.md").write_text("a good report")
    assert main(["reproduce", "--config", str(config), "--out", str(out), "--report-only"]) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert "nothing was written" in err and "Traceback" not in err
    assert (out / "report.md").read_text() == "a good report"


def test_a_kl_set_larger_than_its_pool_warns_and_the_report_records_the_sizes_used(stored):
    from emlens.data.studies import kl_conversations

    pool = kl_conversations("medical", n_rows=None)
    with pytest.warns(UserWarning, match=rf"asks for 100000 conversations, but the train splits .* hold {len(pool)}: the KL set has all"):
        assert len(kl_conversations("medical", n_rows=100_000)) == len(pool)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(kl_conversations("medical", n_rows=len(pool))) == len(pool) and len(kl_conversations("medical", 5)) == 5
    out, run = stored
    assert run.outputs["train/vector/kl=6.6"].result["kl_rows"] == 6 and run.outputs["train/vector/kl=0"].result["kl_rows"] is None
    sizes = json.loads((out / "report.json").read_text())["data_sizes"]
    assert sizes["KL rows (narrow runs)"] == {"requested": 6, "used": {"train/vector/kl=6.6": 6}}
    assert sizes["train rows (target answers)"]["used"] == {"train/vector/kl=0": 6, "train/vector/kl=6.6": 6}
    assert sizes["held-out rows (efficiency)"] == {"requested": 4, "used": {"efficiency/vector": 4}}
    assert sizes["preference questions per domain"]["used"]["preference/main"] == {"medical": 3, "financial": 3, "sports": 3}
    md = (out / "report.md").read_text()
    assert "## Data actually used" in md and "| KL rows (narrow runs) | 6 | 6 |" in md
    assert "| run | steps | rows | KL rows |" in md
