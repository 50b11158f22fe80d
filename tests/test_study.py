"""`emlens reproduce`: every stage runs, the report holds every figure and number, and the stage cache is exact.

A tiny random Llama (saved as a checkpoint) stands in for the model and the grids are small; the
code paths are the ones the full study runs.
"""

from __future__ import annotations

import json
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch

from emlens.study import StudyConfig, run_study
from emlens.study.config import from_dict
from emlens.study.stages import build_stages


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from emlens.models import tiny_hf_model

    path = tmp_path_factory.mktemp("tiny-study")
    model, tokenizer = tiny_hf_model("llama", seed=5, n_layers=4, d_model=64)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def small(tiny_dir, **changes) -> StudyConfig:
    raw = {
        "study": "misalignment",
        "kinds": ["vector", "adapter"],
        "batch_size": 4,
        "model": {"name": str(tiny_dir), "device": "cpu"},
        "data": {"train_rows": 6, "kl_rows": 6, "eval_rows": 4, "web_docs": 2, "web_max_tokens": 64, "max_length": 640},
        "train": {
            kind: {
                "lr": 1e-2,
                "max_steps": 3,
                "batch_size": 2,
                "grad_accum": 1,
                "warmup_steps": 0,
                "kl_batch_size": 2,
                "checkpoint_every": 1,
                "alpha": 4.0,
            }
            for kind in ("vector", "adapter")
        },
        "drift": {"kinds": ["vector"], "steps": 2},
        "kl_sweep": {"kinds": ["vector"], "weights": [0.0, 1.0, 6.6]},
        "mixing": {"kinds": ["vector"], "ratios": [0.0, 0.5]},
        "efficiency": {"points": 3},
        "stability": {"epsilons": [0.0, 0.5], "seeds": [0]},
        "pretraining_kl": {"points": 2, "n_random": 2},
        "preference": {"rows": 3, "bootstrap": 50, "batch_size": 4},
    }
    for key, value in changes.items():
        if isinstance(value, dict):
            raw[key] = {**raw.get(key, {}), **value}
        else:
            raw[key] = value
    return from_dict(raw)


def vector_only(tiny_dir, **changes) -> StudyConfig:
    """:func:`small` with the steering vector's general and narrow runs and their measures only (no drift, sweep, mixing)."""
    return small(tiny_dir, kinds=["vector"], drift={"kinds": []}, kl_sweep={"kinds": []}, mixing={"kinds": []}, **changes)


def judged(url: str) -> dict:
    """The evaluation section for a judge at ``url``: one answer per question, three new tokens."""
    return {"judge_url": url, "n_samples": 1, "max_new_tokens": 3, **({} if url == "local" else {"judge_model": "stub"})}


@pytest.fixture(scope="module")
def first_run(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    return out, run_study(small(tiny_dir), out, progress=False, command="test")


def test_every_stage_runs_and_the_report_has_every_figure_and_number(first_run):
    out, run = first_run
    assert run.cached == [] and run.model_loaded
    names = set(run.outputs)
    for expected in (
        "train/vector/kl=0",
        "train/vector/kl=6.6",
        "train/adapter/kl=0",
        "train/adapter/kl=0.66",
        "train/vector/kl=1",
        "train/vector/mix=0.5",
        "efficiency/vector",
        "stability/adapter",
        "pretraining_kl/vector",
        "drift/vector",
        "kl_sweep/vector",
        "preference/main",
        "preference/kl_sweep/vector",
        "preference/mixing/vector",
    ):
        assert expected in names
    report = json.loads((out / "report.json").read_text())
    assert set(report["stages"]) == names
    assert {"config", "versions", "hardware", "identity", "summary"} <= set(report)
    for stage in report["stages"].values():
        assert stage["seconds"] >= 0 and stage["key"]
    pk = report["stages"]["pretraining_kl/vector"]["result"]
    assert set(pk["kl"]) == {"general", "narrow", "random 1", "random 2"} and all(pk["plans"].values())
    assert report["stages"]["train/vector/kl=6.6"]["result"]["plan"].startswith("offset path")
    md = (out / "report.md").read_text()
    for figure in (
        "efficiency_vector",
        "stability_adapter",
        "pretraining_kl_vector",
        "drift_vector",
        "kl_sweep_pca_vector",
        "mixing_vector",
        "preference",
        "preference_grid",
    ):
        assert (out / "figures" / f"{figure}.png").exists(), figure
        assert f"figures/{figure}.png" in md
    # the training table's losses are means over the last steps, never one (possibly one-row) step's loss
    train = report["stages"]["train/vector/kl=6.6"]["result"]
    tail = train["losses"][-10:]
    row = next(line for line in md.splitlines() if line.startswith("| train/vector/kl=6.6 |"))
    assert "SFT loss (mean of the last 10 steps)" in md
    assert f"| {sum(s['sft'] for s in tail) / len(tail):.3f} | {sum(s['kl'] for s in tail) / len(tail):.4f} |" in row
    # and report.json holds those means: every number the report prints is in its summary
    means = report["summary"]["train/vector/kl=6.6"]
    assert means["sft_mean_last_10_steps"] == pytest.approx(sum(s["sft"] for s in tail) / len(tail))
    assert means["kl_mean_last_10_steps"] == pytest.approx(sum(s["kl"] for s in tail) / len(tail))
    assert report["summary"]["train/vector/kl=0"]["kl_mean_last_10_steps"] is None
    assert "joint PCA over the general run's checkpoints and the narrow run's" in md
    assert "the KL set holds their train splits" in md
    drift = report["stages"]["drift/vector"]["result"]
    assert drift["general_coordinates"] and drift["coordinates"]  # the general run is in the same axes
    assert drift["continued"]["losses"][-1]["step"] == 5  # 3 steps with KL, 2 without, numbered on


def test_a_rerun_with_the_same_settings_does_nothing(first_run, tiny_dir):
    out, _ = first_run
    again = run_study(small(tiny_dir), out, progress=False, command="test")
    assert again.ran == [] and not again.model_loaded  # not even the model was loaded


def test_a_changed_setting_reruns_only_the_stages_that_read_it(first_run, tiny_dir):
    out, _ = first_run
    changed = run_study(small(tiny_dir, stability={"seeds": [0, 1]}), out, progress=False, command="test")
    assert sorted(changed.ran) == ["stability/adapter", "stability/vector"]
    back = run_study(small(tiny_dir), out, progress=False, command="test")
    assert sorted(back.ran) == ["stability/adapter", "stability/vector"]  # the old result was replaced, never reused stale


def test_a_changed_training_setting_reruns_its_runs_and_everything_downstream(first_run, tiny_dir):
    out, _ = first_run
    config = small(tiny_dir, train={"adapter": {**small(tiny_dir).as_dict()["train"]["adapter"], "lr": 5e-3}})
    run = run_study(config, out, progress=False, command="test")
    assert sorted(run.ran) == sorted(
        [
            "train/adapter/kl=0",
            "train/adapter/kl=0.66",
            "efficiency/adapter",
            "stability/adapter",
            "pretraining_kl/adapter",
            "preference/main",
        ]
    )
    run_study(small(tiny_dir), out, progress=False, command="test")  # back to the module's settings


def test_keys_cover_the_data_and_the_model(tiny_dir, monkeypatch):
    from emlens.study import stages

    config = small(tiny_dir)
    before = stages.identity_of(config)
    monkeypatch.setattr(stages, "data_fingerprint", lambda names: "edited")
    assert stages.identity_of(config)["data"] != before["data"]
    other = small(tiny_dir, model={"name": "some/other-model"})
    assert stages.identity_of(other)["model"] != before["model"]
    keys = {s.name: stages.stage_key(s, before, []) for s in build_stages(config)}
    assert len(set(keys.values())) == len(keys)  # no two stages share a key


def test_keys_cover_emlens_own_code(tiny_dir, tmp_path, monkeypatch):
    """An edit to emlens' sources re-keys every stage (the release number alone never changed between commits)."""
    import shutil

    from emlens.study import stages

    root = tmp_path / "pkg"
    shutil.copytree(Path(stages.__file__).resolve().parent.parent, root / "emlens", ignore=shutil.ignore_patterns("__pycache__", "builtin"))

    def version_of(tree: Path) -> str:
        stages._version.cache_clear()
        monkeypatch.setattr(stages, "__file__", str(tree / "emlens" / "study" / "stages.py"))
        return stages._version()

    config = small(tiny_dir)
    identity = stages.identity_of(config)
    try:
        before = version_of(root)
        metrics = root / "emlens" / "metrics.py"
        metrics.write_text(metrics.read_text() + "\n# an edit\n")
        after = version_of(root)
    finally:
        monkeypatch.undo()
        stages._version.cache_clear()  # the next caller hashes the real sources again
    assert before != after and before.split(" ")[0] == after.split(" ")[0]  # same release, other sources
    identity = {**identity, "emlens": before}
    edited = {**identity, "emlens": after}
    for stage in build_stages(config):
        assert stages.stage_key(stage, identity, []) != stages.stage_key(stage, edited, [])


def test_an_interrupted_training_stage_continues_from_its_checkpoint(tiny_dir, tmp_path, monkeypatch):
    from emlens import training
    from emlens.study import stages

    config = vector_only(tiny_dir)
    straight = run_study(config, tmp_path / "straight", progress=False, command="test")
    real_train = training.train
    steps_run: list[int] = []

    def interrupted(*args, **kwargs):
        def on_step(step, record):
            steps_run.append(step)
            if step == 2 and kwargs.get("kl_dataset") is not None:
                raise KeyboardInterrupt

        return real_train(*args, **kwargs, on_step=on_step)

    monkeypatch.setattr(training, "train", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_study(config, tmp_path / "cut", progress=False, command="test")
    narrow_dir = stages.stage_dir(tmp_path / "cut", "train/vector/kl=6.6")
    assert (narrow_dir / "run" / "checkpoint" / "state.pt").exists() and not (narrow_dir / "result.json").exists()
    # the interrupted session's part is timed from its recorded start to its last saved file: pretend it took 100 s
    meta = json.loads((narrow_dir / "stage.json").read_text())
    last_save = max(f.stat().st_mtime for f in narrow_dir.rglob("*") if f.is_file() and f.name != "stage.json")
    (narrow_dir / "stage.json").write_text(json.dumps({**meta, "started_at": last_save - 100.0}))
    steps_run.clear()
    resumed = run_study(config, tmp_path / "cut", progress=False, command="test")
    assert "train/vector/kl=0" not in resumed.ran  # finished before the interruption
    assert steps_run[:1] == [3]  # the narrow run continued after its last checkpoint (step 2)
    a = straight.outputs["train/vector/kl=6.6"].result["losses"]
    b = resumed.outputs["train/vector/kl=6.6"].result["losses"]
    assert a == b
    done = json.loads((narrow_dir / "stage.json").read_text())
    assert done["earlier_sessions"][0]["seconds_to_last_save"] == pytest.approx(100.0)
    assert done["seconds"] == pytest.approx(done["seconds_this_session"] + 100.0) and "seconds_incomplete" not in done
    report = json.loads((tmp_path / "cut" / "report.json").read_text())
    assert report["stages"]["train/vector/kl=6.6"]["seconds"] == pytest.approx(done["seconds"])
    assert report["stage_seconds"] == pytest.approx(sum(st["seconds"] for st in report["stages"].values()))
    assert "(resumed: 100.0 of it in 1 earlier session(s))" in (tmp_path / "cut" / "report.md").read_text()


def test_a_resumed_stage_whose_earlier_start_was_not_recorded_reports_its_time_as_a_lower_bound(tmp_path):
    from emlens.study import stages
    from emlens.study.report import _stage_time

    directory = tmp_path / "stage"
    (directory / "run").mkdir(parents=True)
    (directory / "run" / "state.pt").write_bytes(b"x")
    old = {"environment": {"session": "abc"}}  # stored by a version that did not record its start
    part = stages._interrupted_part(directory, old)
    assert part == {"session": "abc", "seconds_to_last_save": None}
    out = stages.StageOutput("s", directory, "k", {}, 12.0, cached=True, meta={"earlier_sessions": [part], "seconds_incomplete": True})
    assert _stage_time(out) == "≥ 12.0 (resumed: 0.0 of it in 1 earlier session(s))"
    stored_before = stages.StageOutput("s", directory, "k", {}, 12.0, cached=True, meta={"earlier_sessions": [{"session": "abc"}]})
    assert _stage_time(stored_before).startswith("≥ 12.0")  # a stage.json from before times were recorded: a lower bound too
    assert stages._interrupted_part(directory, {}) is None  # nothing known of the earlier session
    started = (directory / "run" / "state.pt").stat().st_mtime + 5.0  # saved nothing after its start
    assert stages._interrupted_part(directory, {"environment": {}, "started_at": started}) == {"seconds_to_last_save": 0.0}


def test_a_mixing_set_holds_exactly_the_configured_aligned_share(first_run):
    out, run = first_run
    mixed = run.outputs["train/vector/mix=0.5"].result
    target = run.outputs["train/vector/kl=0"].result
    assert mixed["rows"] == 2 * target["rows"]  # 6 target rows and 6 aligned ones: a share of 0.5
    report = json.loads((out / "report.json").read_text())
    assert report["summary"]["mixing/vector"]["trained_share"] == [0.0, 0.5]
    assert "| 0.5 | 0.5000 |" in (out / "report.md").read_text()


def test_the_mixing_table_shows_the_share_its_rows_trained():
    """A ratio that whole rows cannot meet (0.3 of 10 target rows: 4 aligned rows, 4/14) is shown with the share trained."""
    from emlens.study.report import _trained_share

    r = {"train/vector/kl=0": {"rows": 10}, "train/vector/mix=0.3": {"rows": 14}}
    assert _trained_share(r, "vector", 0.3) == pytest.approx(4 / 14) and _trained_share(r, "vector", 0.0) == 0.0
    assert _trained_share({}, "vector", 0.3) is None


def test_a_mixing_ratio_the_aligned_pool_cannot_supply_stops_the_study_before_any_work(tiny_dir, tmp_path):
    from emlens.study.stages import Context
    from emlens.validation import ConfigError

    config = small(tiny_dir, data={"train_rows": 6}, mixing={"ratios": [0.0, 0.9]})
    ctx = Context(config, tmp_path, progress=False)
    ctx.aligned_pool = lambda wanted: ctx.target_rows()[:5]  # type: ignore[method-assign]  # a pool of 5 rows; 0.9 needs 54
    with pytest.raises(
        ConfigError, match=r"mixing ratio 0.9 needs 54 aligned rows .* hold 5: the largest ratio this data supports is 0.455"
    ):
        run_study(config, tmp_path, progress=False, command="test", context=ctx)
    assert not ctx.model_loaded and not (tmp_path / "stages").exists()


def test_the_config_file_is_checked():
    from emlens.validation import ConfigError

    with pytest.raises(ConfigError, match="unknown setting"):
        from_dict({"stabilty": {}})
    with pytest.raises(ConfigError, match="0.5 more than once"):
        from_dict({"stability": {"epsilons": [0.5, 0.5]}})
    with pytest.raises(ConfigError, match="kinds"):
        from_dict({"kinds": ["lora-ish"]})
    with pytest.raises(ConfigError, match="both name the training stage 'kl=1'"):
        from_dict({"kl_sweep": {"weights": [0, 1.0, 1.0000001]}})  # an int, as TOML writes 0
    with pytest.raises(ConfigError, match="both name the training stage 'mix=0.25'"):
        from_dict({"mixing": {"ratios": [0.25, 0.2500000001]}})
    with pytest.raises(ConfigError, match=r"train.vector.kl_weight.*'kl=1'"):
        from_dict({"train": {"vector": {"kl_weight": 1.0000001}}})  # the narrow run and the sweep's λ = 1
    with pytest.raises(ConfigError, match="data.domain"):
        from_dict({"data": {"domain": "law"}})  # a KL-only domain: the study trains on medical, financial or sports
    with pytest.raises(ConfigError, match="leaves out the trained domain 'medical'"):
        from_dict({"preference": {"domains": ["financial", "sports"]}})
    with pytest.raises(ConfigError, match="preference.domains"):
        from_dict({"preference": {"domains": ["medical", "astrology"]}})
    # an adapter that the sweep leaves out may share a name with a swept weight of the vector's
    from_dict({"train": {"adapter": {"kl_weight": 1.0000001}}, "kl_sweep": {"kinds": ["vector"]}})
    # TOML's integers are read as the floats they stand for: the same config, the same stage keys
    from emlens.study.config import section_key

    ints = from_dict({"kl_sweep": {"weights": [0, 1, 3]}, "train": {"vector": {"kl_weight": 2}}})
    floats = from_dict({"kl_sweep": {"weights": [0.0, 1.0, 3.0]}, "train": {"vector": {"kl_weight": 2.0}}})
    assert section_key(ints.kl_sweep) == section_key(floats.kl_sweep)
    assert section_key(ints.train["vector"]) == section_key(floats.train["vector"])
    # and so are a config's ints set in Python (in every float field of every section), once it is validated
    built = from_dict({})
    built.train["vector"].kl_weight, built.train["vector"].alpha, built.kl_sweep.weights = 2, 256, [0, 1, 3]
    built.efficiency.max_factor, built.evaluation.temperature, built.model.layer_fraction = 2, 1, 0
    built.validate()
    assert section_key(built.kl_sweep) == section_key(floats.kl_sweep)
    assert section_key(built.train["vector"]) == section_key(floats.train["vector"])
    assert built.efficiency.max_factor == 2.0 and isinstance(built.efficiency.max_factor, float)
    assert isinstance(built.evaluation.temperature, float) and isinstance(built.model.layer_fraction, float)
    assert isinstance(built.efficiency.points, int)  # ints stay ints
    paper = StudyConfig.load()
    assert paper.train["vector"].lr == 1e-4 and paper.train["adapter"].kl_weight == 0.66
    assert paper.stability.epsilons[0] == 0.0 and paper.kl_sweep.weights == [0.0, 1.0, 3.0, 10.0, 30.0, 100.0]


def test_technical_prose_study_builds_its_stages(tiny_dir, tmp_path):
    config = vector_only(tiny_dir, study="technical-prose")
    run = run_study(config, tmp_path, progress=False, command="test")
    pref = run.outputs["preference/main"].result
    assert set(pref["settings"]["domains"]) == {"vehicles", "astronomy", "cooking", "gardening", "photography"}
    assert pref["trained_domain"] == "vehicles"


def test_the_thin_command_writes_the_stage_result_format(first_run, tiny_dir, tmp_path):
    from emlens.cli import main
    from emlens.study.stages import stage_dir

    out, run = first_run
    general = stage_dir(out, "train/vector/kl=0") / "intervention.safetensors"
    narrow = stage_dir(out, "train/vector/kl=6.6") / "intervention.safetensors"
    code = main(
        [
            "efficiency",
            f"general={general}",
            f"narrow={narrow}",
            "--model",
            str(tiny_dir),
            "--device",
            "cpu",
            "--data",
            "medical_harmful",
            "--limit",
            "4",
            "--max-length",
            "640",
            "--points",
            "3",
            "--batch-size",
            "4",
            "--out",
            str(tmp_path / "eff"),
        ]
    )
    assert code == 0 and (tmp_path / "eff.png").exists()
    thin = json.loads((tmp_path / "eff.json").read_text())
    stage = run.outputs["efficiency/vector"].result
    alpha = small(tiny_dir).train["vector"].alpha  # norms are reported with and without the vectors' fixed scale
    assert {k: v / alpha for k, v in stage["solution_norms"].items()} == pytest.approx(stage["solution_norms_unscaled"])
    assert set(stage) <= set(thin) and thin["norms"] == pytest.approx(stage["norms"])
    assert thin["loss"]["narrow"] == pytest.approx(stage["loss"]["narrow"], rel=1e-5)


def test_the_report_can_be_rewritten_from_the_stored_stages(first_run, tiny_dir):
    from emlens.study import rewrite_report

    out, run = first_run
    (out / "report.md").unlink()
    path = rewrite_report(small(tiny_dir), out, command="test rewrite")
    text = path.read_text()
    assert "test rewrite" in text and "figures/efficiency_vector.png" in text
    assert set(json.loads((out / "report.json").read_text())["stages"]) == set(run.outputs)


def test_a_partial_study_can_be_reported(first_run, tiny_dir, tmp_path):
    """rewrite_report on a study cut off before a narrow run finished reports what exists (no KeyError)."""
    import shutil

    from emlens.study import rewrite_report
    from emlens.study.stages import stage_dir

    out, _ = first_run
    partial = tmp_path / "partial"
    shutil.copytree(out, partial)
    shutil.rmtree(stage_dir(partial, "train/vector/kl=6.6"))
    text = rewrite_report(small(tiny_dir), partial, command="partial").read_text()
    assert "narrow — not run yet" in text
    assert "train/vector/kl=6.6" not in json.loads((partial / "report.json").read_text())["stages"]


def test_a_rewritten_report_leaves_out_stages_stored_under_other_settings(first_run, tiny_dir, tmp_path):
    """--report-only with a changed setting must not pair the new config with the old settings' numbers."""
    import shutil

    from emlens.study import rewrite_report

    out, run = first_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    config = small(tiny_dir)
    config.stability.seeds = [*config.stability.seeds, 99]
    with pytest.warns(UserWarning, match="left out of the report: stability/vector"):
        rewrite_report(config, copy, command="changed seeds")
    report = json.loads((copy / "report.json").read_text())
    assert not any(name.startswith("stability/") for name in report["stages"])
    assert set(report["stages"]) == {n for n in run.outputs if not n.startswith("stability/")}
    assert report["identity"]["left_out"] == [n for n in run.outputs if n.startswith("stability/")]


def test_a_judged_study_adds_the_evaluation_stages_and_quadrants(tiny_dir, tmp_path):
    config = vector_only(tiny_dir, evaluation=judged("local"))
    run = run_study(config, tmp_path, progress=False, command="test")
    assert {"evaluation/base", "evaluation/vector_general", "evaluation/vector_narrow"} <= set(run.outputs)
    result = run.outputs["evaluation/vector_narrow"].result
    assert result["general"]["n_answers"] == 8 and "misaligned_rate" in result["narrow"]["rates"]
    assert result["plan"].startswith(("offset path", "hooked path", "prefix path"))  # which path sampled the answers
    md = (tmp_path / "report.md").read_text()
    assert "## Judged evaluation" in md and "quadrants.png" in md
    assert len(result["general"]["rates"]["misaligned_ci_by_question"]) == 2 and "resamples the questions" in md


def test_the_narrowness_ratio_is_undefined_when_the_other_domains_do_not_move_the_same_way():
    """A negative or zero mean out-of-domain shift gives no ratio (n/a with a note), not a negative number or ∞."""
    from emlens.study.report import RATIO_NOTE, _f, _ratio_note, narrowness

    def row(inside, *others):
        return {"trained": {"mean": inside}, **{f"other {k}": {"mean": v} for k, v in enumerate(others)}}

    stats = narrowness({"broad": row(0.3, 0.2, 0.1), "opposite": row(0.01, -0.05, -0.03), "still": row(0.1, 0.0, 0.0)}, "trained")
    assert stats["broad"]["ratio"] == pytest.approx(2.0)
    assert stats["opposite"]["ratio"] is None and stats["opposite"]["out_of_domain"] == pytest.approx(-0.04)
    assert stats["still"]["ratio"] is None
    assert _f(stats["opposite"]["ratio"], 2) == "n/a"
    assert _ratio_note(stats) == [RATIO_NOTE, ""] and _ratio_note({"broad": stats["broad"]}) == []


class UnusableThenUsableJudge(BaseHTTPRequestHandler):
    """An OpenAI-compatible judge whose replies are unusable (a positive logprob) until ``usable`` is set."""

    usable: ClassVar[bool] = False

    def log_message(self, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        token, logprob = ("80", -0.01) if type(self).usable else ("80", 0.5)
        top = {"token": token, "logprob": logprob, "bytes": None}
        payload = {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"], "choices": [
            {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": token},
             "logprobs": {"content": [{**top, "top_logprobs": [top]}]}}]}  # fmt: skip
        data = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture()
def http_judge():
    """The URL of a real OpenAI-compatible judge on localhost (:class:`UnusableThenUsableJudge`), unusable at first."""
    from tests.conftest import serve

    UnusableThenUsableJudge.usable = False
    yield from serve(UnusableThenUsableJudge)


def test_a_judge_that_leaves_answers_unscored_leaves_the_stage_unfinished_and_a_rerun_judges_them(tiny_dir, tmp_path, http_judge):
    """Rates from part of the answers are never reported as final, nor cached: the stage stays open until judged."""
    from emlens.study.stages import IncompleteEvaluation, stage_dir

    config = vector_only(tiny_dir, evaluation=judged(http_judge))
    with pytest.warns(UserWarning), pytest.raises(IncompleteEvaluation, match="run `emlens reproduce` again"):
        run_study(config, tmp_path, progress=False, command="test")
    meta = json.loads((stage_dir(tmp_path, "evaluation/base") / "stage.json").read_text())
    assert meta["finished"] is False
    UnusableThenUsableJudge.usable = True  # the judge is fixed: the same command judges what is left
    run = run_study(config, tmp_path, progress=False, command="test")
    result = run.outputs["evaluation/base"].result
    assert result["general"]["n_pending"] == 0 and result["general"]["rates"]["n_scored"] == 8
    assert "| 8/8 |" in (tmp_path / "report.md").read_text()


def test_the_report_and_every_stage_result_are_strict_json(first_run):
    """No NaN or Infinity (invalid JSON) anywhere: an undefined number is null (drift's first cosine, for one)."""
    out, _ = first_run

    def refuse(constant: str) -> None:
        raise AssertionError(f"non-finite JSON constant {constant}")

    files = [out / "report.json", *sorted((out / "stages").glob("*/result.json"))]
    assert len(files) > 10
    for path in files:
        json.loads(path.read_text(), parse_constant=refuse)
    drift = json.loads((out / "report.json").read_text())["stages"]["drift/vector"]["result"]
    assert drift["cosine_to_general"][0] is None  # the zero-initialised checkpoint has no direction


def test_the_studys_layer_is_the_thin_commands_middle_layer_for_every_block_count():
    """reproduce (layer_fraction 0.5) and the thin commands (default_layer) pick the same block, odd counts too."""
    from types import SimpleNamespace

    from emlens.models import default_layer
    from emlens.study.config import ModelSection

    section = ModelSection(layer_fraction=0.5)
    for n in range(1, 81):
        assert section.layer(n) == default_layer(SimpleNamespace(cfg=SimpleNamespace(n_layers=n))), n
    assert section.layer(48) == 24 and ModelSection(layer_fraction=0.75).layer(48) == 36


def test_the_ratio_needs_an_out_of_domain_shift_distinguishable_from_zero():
    """A tiny positive mean out-of-domain shift whose CI reaches zero gives n/a, not a ratio of hundreds."""
    import numpy as np

    from emlens.study.report import mean_of_domains_ci, narrowness

    rng = np.random.default_rng(0)
    diffs = {
        "noisy": {
            "trained": 0.3 + 0.01 * rng.standard_normal(40),
            "a": 0.002 + 0.05 * rng.standard_normal(40),
            "b": 0.05 * rng.standard_normal(12),
        },
        "clear": {
            "trained": 0.3 + 0.01 * rng.standard_normal(40),
            "a": 0.1 + 0.01 * rng.standard_normal(40),
            "b": 0.2 + 0.01 * rng.standard_normal(12),
        },
    }
    shifts = {n: {d: {"mean": float(v.mean())} for d, v in row.items()} for n, row in diffs.items()}
    stats = narrowness(shifts, "trained", diffs, n_boot=500, seed=1)
    assert stats["noisy"]["ratio"] is None and stats["noisy"]["out_of_domain_ci"][0] <= 0
    clear = stats["clear"]
    # the mean of the two domains' means, not the pooled mean of their 52 questions (the domains differ in size)
    assert clear["out_of_domain"] == pytest.approx((diffs["clear"]["a"].mean() + diffs["clear"]["b"].mean()) / 2)
    assert clear["ratio"] == pytest.approx(clear["in_domain"] / clear["out_of_domain"])
    lo, hi = mean_of_domains_ci([diffs["clear"]["a"], diffs["clear"]["b"]], 500, 1)
    assert lo < clear["out_of_domain"] < hi and clear["out_of_domain_ci"] == [lo, hi]


def test_report_numbers_print_undefined_values_as_na_and_no_negative_zero():
    import numpy as np

    from emlens.study.report import _f

    assert _f(-0.00001, 1) == "0.0" and _f(-0.2, 1) == "-0.2"
    assert _f(np.float32("nan")) == "n/a" and _f(None) == "n/a" and _f(np.float32(1.23456)) == "1.235"


def test_a_judged_technical_prose_study_scores_the_technical_register(tiny_dir, tmp_path, http_judge, monkeypatch):
    """The technical_prose judge scores the general answers and held-out narrow-domain answers (a real HTTP judge)."""
    from emlens import evaluation
    from emlens.study.stages import TECHNICAL_QUESTIONS

    UnusableThenUsableJudge.usable = True  # answers "80" to every prompt
    config = vector_only(tiny_dir, study="technical-prose", evaluation=judged(http_judge))
    groups_seen: list[Any] = []
    real_ci = evaluation.bootstrap_ci  # what the register's question-clustered interval calls

    def recording_ci(values, *args, groups=None, **kwargs):
        if len(values) and all(v == 80.0 for v in values):  # the register's scores (the judge says 80 to all)
            groups_seen.append(groups)
        return real_ci(values, *args, groups=groups, **kwargs)

    monkeypatch.setattr(evaluation, "bootstrap_ci", recording_ci)
    run = run_study(config, tmp_path, progress=False, command="test")
    # the interval resamples whole questions (answers to one question are not independent draws)
    assert groups_seen and all(g is not None and len(set(g)) >= 2 for g in groups_seen)
    technical = run.outputs["evaluation/vector_narrow"].result["technical"]
    assert technical["judge"] == "technical_prose"
    assert technical["general"]["n_answers"] == 8 and technical["vehicles"]["n_answers"] == TECHNICAL_QUESTIONS
    for part in ("general", "vehicles"):
        assert technical[part]["mean"] == pytest.approx(80.0) and technical[part]["n_pending"] == 0
    md = (tmp_path / "report.md").read_text()
    assert "Judged technical register" in md and "80.0 [80.0, 80.0] (8/8)" in md
    register = json.loads((tmp_path / "report.json").read_text())["summary"]["technical_register"]
    assert len(register) == 3 and all(r["vehicles"]["n_scored"] == TECHNICAL_QUESTIONS for r in register.values())  # base, general, narrow


def test_emlens_reproduce_with_a_judge_that_leaves_answers_unscored_exits_3_and_keeps_the_work(tiny_dir, tmp_path, capsys, http_judge):
    """The command line says what happened in one line (exit 3, as `emlens evaluate`), no traceback; a re-run finishes."""
    from emlens.cli import EXIT_JUDGE_FAILED, main

    def toml(raw: dict, prefix: str = "") -> str:
        flat = "".join(f"{k} = {json.dumps(v)}\n" for k, v in raw.items() if not isinstance(v, dict))
        tables = "".join(f"\n[{prefix}{k}]\n" + toml(v, f"{prefix}{k}.") for k, v in raw.items() if isinstance(v, dict))
        return flat + tables

    raw = {
        "study": "misalignment",
        "kinds": ["vector"],
        "model": {"name": str(tiny_dir), "device": "cpu"},
        "data": {"train_rows": 4, "kl_rows": 4, "eval_rows": 2, "web_docs": 1, "web_max_tokens": 32, "max_length": 640},
        "train": {
            "vector": {"lr": 1e-2, "max_steps": 2, "batch_size": 2, "grad_accum": 1, "warmup_steps": 0, "kl_batch_size": 2, "alpha": 4.0}
        },
        "drift": {"kinds": []},
        "kl_sweep": {"kinds": []},
        "mixing": {"kinds": []},
        "efficiency": {"points": 2},
        "stability": {"epsilons": [0.0, 0.5], "seeds": [0]},
        "pretraining_kl": {"points": 2, "n_random": 1},
        "preference": {"rows": 2, "bootstrap": 20},
        "evaluation": {**judged(http_judge), "max_new_tokens": 2},
    }
    config = tmp_path / "study.toml"
    config.write_text(toml(raw))
    argv = ["reproduce", "--config", str(config), "--out", str(tmp_path / "out")]
    assert main(argv) == EXIT_JUDGE_FAILED
    err = capsys.readouterr().err
    assert "judged rates would come from part of the answers" in err and "Traceback" not in err
    assert "run the same command again to continue" in err
    UnusableThenUsableJudge.usable = True
    assert main(argv) == 0
    assert "reused from" in capsys.readouterr().out



def test_the_random_baselines_mean_holds_only_the_baselines(model, dataset):
    """A solution named like a baseline would be averaged into the baselines' mean (or overwrite a baseline's curve):
    refused; the mean is over the drawn baselines alone, and the settings record the seed and any max_norm."""
    from emlens import SteeringVector
    from emlens.study.config import PretrainingKLSection
    from emlens.study.measures import measure_pretraining_kl

    vec = SteeringVector(1, model.cfg.d_model, alpha=1.0, init=torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(1)))
    section = PretrainingKLSection(points=2, n_random=2)
    for name in ("random 1", "Randomised"):
        with pytest.raises(ValueError, match="marks random baselines"):
            measure_pretraining_kl(model, {name: vec}, dataset, section, progress=False)
    out = measure_pretraining_kl(model, {"solution": vec}, dataset, section, progress=False, seed=3, max_norm=2.0)
    assert set(out["kl"]) == {"solution", "random 1", "random 2"}
    assert out["random_mean"] == pytest.approx([(a + b) / 2 for a, b in zip(out["kl"]["random 1"], out["kl"]["random 2"])])
    assert out["settings"]["seed"] == 3 and out["settings"]["max_norm"] == 2.0 and out["norms"][-1] == 2.0


def test_solutions_of_different_kinds_are_not_put_on_one_norm_axis(model, dataset):
    """A vector's norm and an adapter's measure different things: efficiency and stability's 'min' rule refuse the mix
    (stability's 'own' rule keeps each at its own norm, so it measures both)."""
    from emlens import RankOneAdapter, SteeringVector
    from emlens.study.config import EfficiencySection, StabilitySection
    from emlens.study.measures import measure_efficiency, measure_stability

    vec = SteeringVector(1, model.cfg.d_model, alpha=1.0, init=torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(1)))
    adapter = RankOneAdapter.for_model(model, 1, seed=2)
    with torch.no_grad():
        adapter.b.copy_(torch.randn(adapter.d_model, generator=torch.Generator().manual_seed(3)))
    mixed = {"vector": vec, "adapter": adapter}
    with pytest.raises(ValueError, match=r"different kinds \(vector \(steering_vector\), adapter \(rank_one_adapter\)\)"):
        measure_efficiency(model, mixed, dataset, EfficiencySection(points=2), progress=False)
    with pytest.raises(ValueError, match="rule 'min'"):
        measure_stability(model, mixed, dataset, StabilitySection(epsilons=[0.0, 0.5], seeds=[0]), progress=False)
    own = measure_stability(model, mixed, dataset, StabilitySection(epsilons=[0.0, 0.5], seeds=[0], norm="own"), progress=False)
    assert set(own["results"]) == {"vector", "adapter"}
