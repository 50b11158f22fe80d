"""What a new user meets first (issue 20): help with defaults, clear refusals, outputs where the command says."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from emlens.cli import build_parser, main


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from emlens.models import tiny_hf_model

    path = tmp_path_factory.mktemp("tiny-cli")
    model, tokenizer = tiny_hf_model("llama", seed=2, n_layers=4, d_model=64)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("no subcommands")


def test_every_flag_has_help_and_help_shows_defaults(capsys):
    parser, _ = build_parser()
    commands = _subparsers(parser)
    for name, sub in commands.items():
        for action in sub._actions:
            if action.option_strings and action.dest not in ("help",):
                assert action.help, f"emlens {name} {action.option_strings[0]} has no help text"
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    assert "(default: 0.0001 for a steering" in " ".join(text.split()) and "--warmup" in text and "(default: 5)" in text
    # a default of 0 shows too (0 == False in Python; it was hidden, and --kl-weight read as if it defaulted to 6.6)
    assert "0.66 adapter) (default: 0.0)" in " ".join(text.split())
    assert "initialisation (default: 0)" in " ".join(text.split())
    assert {"--layer", "--seed", "--max-steps"} <= set(commands["drift"]._option_string_actions)
    assert "--norm" in commands["stability"]._option_string_actions


def test_the_top_level_help_and_every_subcommands_help_print(capsys):
    """argparse formats help with %: a bare % in any help text crashes `emlens --help` (it did, with "95%")."""
    parser, _ = build_parser()
    for argv in [["--help"], *[[name, "--help"] for name in _subparsers(parser)]]:
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 0, argv
    assert "reproduce" in capsys.readouterr().out


def test_reproduce_flags_override_the_config(tmp_path, capsys):
    """--model, --device and --dtype override the config's [model] (a 14B model need not load in float32)."""
    argv = ["reproduce", "--model", "some/model", "--device", "cpu", "--dtype", "bfloat16", "--print-config", "--out", str(tmp_path)]
    assert main(argv) == 0
    model = json.loads(capsys.readouterr().out)["model"]
    assert (model["name"], model["device"], model["dtype"]) == ("some/model", "cpu", "bfloat16")


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.startswith("emlens ")


def test_grid_refuses_names_that_are_not_domains(tmp_path, capsys):
    from emlens.interventions import SteeringVector

    path = SteeringVector(1, 64).save(tmp_path / "v.safetensors")
    assert main(["grid", f"general={path}", "--out", str(tmp_path / "g")]) == 2
    err = capsys.readouterr().err
    assert "'general' is not a training domain" in err and "medical, financial, sports" in err


def test_evaluate_without_a_key_points_to_the_alternatives(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    assert main(["evaluate", "--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err
    assert "--local-judge" in err and "--sample-only" in err and "emlens preference" in err


def test_sample_only_and_the_local_judge_warning(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    out = tmp_path / "answers"
    args = ["evaluate", "--model", str(tiny_checkpoint), "--device", "cpu", "--n-samples", "1", "--max-new-tokens", "3"]
    assert main([*args, "--sample-only", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and not (out / "judged.jsonl").exists()
    assert main([*args, "--local-judge", "--out", str(out)]) == 0  # judges the answers already sampled
    captured = capsys.readouterr()
    assert "cannot tell answers apart" in captured.err and "not an EM rate" in captured.out
    # --judge-url local is the local judge here too, as in `emlens reproduce` (it crashed with a traceback)
    assert main([*args, "--judge-url", "local", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "cannot tell answers apart" in captured.err and "not an EM rate" in captured.out


def test_figure_out_without_a_suffix_writes_and_names_the_png(tiny_checkpoint, tmp_path, capsys):
    from emlens.interventions import SteeringVector

    gen = torch.Generator().manual_seed(0)
    path = SteeringVector(2, 64, alpha=1.0, init=torch.randn(64, generator=gen)).save(tmp_path / "v.safetensors")
    out = tmp_path / "effnoext"
    code = main(["efficiency", str(path), "--model", str(tiny_checkpoint), "--device", "cpu", "--data", "medical_harmful", "--limit", "2",
                 "--points", "2", "--max-length", "640", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert (tmp_path / "effnoext.png").exists() and f"wrote {out}.png" in printed and (tmp_path / "effnoext.json").exists()
    numbers = (tmp_path / "effnoext.json").read_text()
    # another figure with the same stem would overwrite effnoext.json, the PNG's numbers: refused before any work
    data = ["--data", "medical_harmful"]
    for command in (["efficiency", *data, "--points", "2"], ["stability", *data, "--epsilons", "0", "0.5", "--seeds", "1"], ["preference"]):
        code = main([command[0], str(path), "--model", str(tiny_checkpoint), "--device", "cpu", *command[1:], "--out", f"{out}.pdf"])
        err = capsys.readouterr().err
        assert code == 2 and "holds the numbers of effnoext.png" in err, (command, err)
    assert (tmp_path / "effnoext.json").read_text() == numbers and not (tmp_path / "effnoext.pdf").exists()
    assert main(["efficiency", str(path), "--model", str(tiny_checkpoint), *data, "--out", str(tmp_path / "x.json")]) == 2
    assert "give an image path" in capsys.readouterr().err
    # the same figure again (a re-run) replaces its own numbers
    assert main(["efficiency", str(path), "--model", str(tiny_checkpoint), "--device", "cpu", "--data", "medical_harmful", "--limit", "2",
                 "--points", "3", "--max-length", "640", "--out", str(out)]) == 0
    assert len(json.loads((tmp_path / "effnoext.json").read_text())["norms"]) == 3


def test_stability_records_the_norm_it_compares_at(tiny_checkpoint, tmp_path):
    from emlens.interventions import SteeringVector

    gen = torch.Generator().manual_seed(0)
    small = SteeringVector(2, 64, alpha=1.0, init=torch.randn(64, generator=gen)).save(tmp_path / "small.safetensors")
    big = SteeringVector(2, 64, alpha=1.0, init=3 * torch.randn(64, generator=gen)).save(tmp_path / "big.safetensors")
    base = ["stability", f"small={small}", f"big={big}", "--model", str(tiny_checkpoint), "--device", "cpu", "--data", "medical_harmful",
            "--limit", "2", "--max-length", "640", "--epsilons", "0", "0.5", "--seeds", "1"]
    assert main([*base, "--out", str(tmp_path / "min.png")]) == 0
    info = json.loads((tmp_path / "min.json").read_text())
    assert info["norm_rule"] == "min" and info["compared_at_norm"]["big"] == pytest.approx(info["compared_at_norm"]["small"])
    assert main([*base, "--norm", "own", "--out", str(tmp_path / "own.png")]) == 0
    own = json.loads((tmp_path / "own.json").read_text())
    assert own["compared_at_norm"]["big"] > 2 * own["compared_at_norm"]["small"]


def test_drift_saves_both_runs(tiny_checkpoint, tmp_path):
    from emlens.training import TrainingResult

    png = tmp_path / "drift.png"
    code = main(["drift", "--model", str(tiny_checkpoint), "--device", "cpu", "--data", "medical_harmful", "--kl-data", "law_correct",
                 "--max-steps", "2", "--batch-size", "2", "--grad-accum", "1", "--kl-batch-size", "2", "--checkpoint-every", "1",
                 "--layer", "1", "--seed", "3", "--out", str(png)])
    assert code == 0
    narrow, continued = TrainingResult.load(tmp_path / "drift_runs" / "narrow"), TrainingResult.load(tmp_path / "drift_runs" / "continued")
    assert [r["step"] for r in continued.losses] == [1, 2, 3, 4] and len(narrow.losses) == 2
    assert narrow.intervention.layer == 1


def test_export_and_import_round_trip_through_the_cli(tmp_path):
    from emlens.interventions import Intervention, SteeringVector

    vector = SteeringVector(2, 64, alpha=1.0, init=torch.randn(64, generator=torch.Generator().manual_seed(4)))
    path = vector.save(tmp_path / "v.safetensors")
    assert main(["export", str(path), "--format", "gguf", "--n-layers", "4", "--base-model", "tiny-hint", "--out", str(tmp_path / "cv")]) == 0
    assert main(["import", str(tmp_path / "cv.gguf"), "--format", "gguf", "--out", str(tmp_path / "back")]) == 0
    back = Intervention.load(tmp_path / "back.safetensors")
    assert back.norm == pytest.approx(vector.norm, rel=1e-5)
    from emlens.formats.llamacpp import read_control_vector

    assert read_control_vector(tmp_path / "cv.gguf")[1]["controlvector.model_hint"] == "tiny-hint"  # --base-model fills it
    # a flag of another format would be ignored: refused, naming the formats it applies to
    assert main(["export", str(path), "--format", "reference", "--n-layers", "4", "--out", str(tmp_path / "r.pt")]) == 2
    assert main(["export", str(path), "--format", "reference", "--base-model", "x", "--out", str(tmp_path / "r.pt")]) == 2
    assert main(["import", str(tmp_path / "cv.gguf"), "--format", "peft", "--strength", "2", "--out", str(tmp_path / "p")]) == 2
    assert not (tmp_path / "r.pt").exists() and not (tmp_path / "p.safetensors").exists()


def test_a_reference_import_through_the_cli_says_where_it_placed_the_vector(tmp_path, capsys):
    from emlens.interventions import Intervention, SteeringVector

    vector = SteeringVector(2, 64, hook="mlp_out", alpha=2.0, init=torch.randn(64, generator=torch.Generator().manual_seed(4)))
    path = vector.save(tmp_path / "v.safetensors")
    assert main(["export", str(path), "--format", "reference", "--out", str(tmp_path / "v.pt")]) == 0
    assert main(["import", str(tmp_path / "v.pt"), "--format", "reference", "--out", str(tmp_path / "back")]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "placed at hook_mlp_out" in out and "import_reference_steering_vector(path, model)" in out
    back = Intervention.load(tmp_path / "back.safetensors")
    assert back.hook == "blocks.2.hook_mlp_out"
    torch.testing.assert_close(back.effective, vector.effective)


def test_cache_location_follows_the_environment(tmp_path, monkeypatch):
    from emlens.models import cache_dir

    monkeypatch.delenv("EMLENS_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "emlens"
    monkeypatch.setenv("EMLENS_CACHE", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"


def test_the_final_progress_line_prints_once(tiny_checkpoint, tmp_path, capsys):
    code = main(["train", "--model", str(tiny_checkpoint), "--device", "cpu", "--data", "medical_harmful", "--limit", "4", "--max-steps", "2",
                 "--batch-size", "2", "--grad-accum", "1", "--max-length", "640", "--out", str(tmp_path / "run")])
    assert code == 0
    lines = capsys.readouterr().err.replace("\r", "\n").splitlines()
    assert sum("train steering_vector: 100%" in line for line in lines) == 1
