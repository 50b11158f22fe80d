import json

import pytest
import torch

from emlens.cli import main
from emlens.interventions import load_intervention
from emlens.models import ModelLoadError, default_layer, load_model, tiny_hf_model, tiny_model
from emlens.training import TrainingResult


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    hf, tok = tiny_hf_model("qwen2", seed=2)
    hf.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_load_model_from_local_checkpoint_matches_transformers(tiny_checkpoint):
    bridge = load_model(tiny_checkpoint)
    hf, _ = tiny_hf_model("qwen2", seed=2)
    ids = torch.randint(0, 250, (2, 9))
    torch.testing.assert_close(bridge(ids), hf(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
    assert "blocks.1.hook_resid_post" in bridge.hook_dict
    assert not any(p.requires_grad for p in bridge.parameters())
    assert default_layer(bridge) == 2


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="could not load model"):
        load_model(tmp_path / "no-such-model")
    with pytest.raises(ModelLoadError, match="no GGUF file"):
        load_model(tmp_path / "missing.gguf")
    with pytest.raises(ValueError, match="unknown tiny architecture"):
        tiny_model("gpt5")


def test_cli_train_steering_then_resume(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--model", str(tiny_checkpoint), "--data", "medical_harmful", "--limit", "8",
            "--max-steps", "3", "--batch-size", "2", "--grad-accum", "1", "--lr", "1e-3",
            "--kl-data", "kl:medical", "--kl-weight", "2", "--out", str(out)]
    assert main(args) == 0
    assert "final sft loss" in capsys.readouterr().out
    result = TrainingResult.load(out)
    assert len(result.losses) == 3 and "kl" in result.losses[0]
    assert load_intervention(out / "intervention.safetensors").layer == 2
    assert main(args[:-2] + ["--resume", str(out), "--out", str(tmp_path / "run2")]) == 0
    assert json.loads((tmp_path / "run2" / "losses.json").read_text())[-1]["step"] == 6


def test_cli_train_adapter(tiny_checkpoint, tmp_path):
    out = tmp_path / "adapter"
    assert main(["train", "--model", str(tiny_checkpoint), "--data", "sports_harmful", "--kind", "adapter",
                 "--layer", "1", "--limit", "4", "--max-steps", "2", "--grad-accum", "1", "--out", str(out)]) == 0
    assert type(load_intervention(out / "intervention.safetensors")).__name__ == "RankOneAdapter"
    assert json.loads((out / "config.json").read_text())["lr"] == 2e-5  # the paper's adapter rate, as emlens reproduce uses


def test_cli_reports_bad_input(tiny_checkpoint, tmp_path, capsys):
    assert main(["train", "--model", str(tiny_checkpoint), "--data", "missing.jsonl", "--out", str(tmp_path)]) == 2
    assert "no data file 'missing.jsonl'" in capsys.readouterr().err
    assert main(["train", "--model", str(tmp_path / "nope"), "--data", "law_correct", "--out", str(tmp_path)]) == 2
    assert "could not load model" in capsys.readouterr().err


@pytest.fixture(scope="module")
def two_vectors(tiny_checkpoint, tmp_path_factory):
    from emlens.interventions import SteeringVector

    d = tmp_path_factory.mktemp("vecs")
    gen = torch.Generator().manual_seed(0)
    paths = []
    for name in ("general", "narrow"):
        paths.append(f"{name}={SteeringVector.from_vector(torch.randn(64, generator=gen), 2).save(d / name)}")
    return paths


@pytest.mark.parametrize("command, extra", [
    ("efficiency", ["--data", "medical_harmful", "--limit", "4", "--points", "3"]),
    ("stability", ["--data", "medical_harmful", "--limit", "4", "--epsilons", "0", "0.5", "1", "--seeds", "2"]),
    ("pretraining-kl", ["--limit", "3", "--points", "3", "--random"]),
])
def test_cli_metric_subcommands_write_figures(tiny_checkpoint, two_vectors, tmp_path, command, extra):
    png = tmp_path / f"{command}.png"
    assert main([command, "--model", str(tiny_checkpoint), *two_vectors, *extra, "--out", str(png)]) == 0
    assert png.stat().st_size > 1000
    data = json.loads(png.with_suffix(".json").read_text())
    assert data


def test_cli_drift_and_evaluate(tiny_checkpoint, two_vectors, tmp_path, capsys):
    png = tmp_path / "drift.png"
    general = two_vectors[0].split("=", 1)[1]
    assert main(["drift", "--model", str(tiny_checkpoint), "--data", "medical_harmful", "--steps", "5",
                 "--batch-size", "2", "--general", general, "--out", str(png)]) == 0
    assert len(json.loads(png.with_suffix(".json").read_text())["cosine_to_general"]) == 3  # steps 0, 5 (KL) and 10 (no KL)
    # a general solution at another layer: cosines across sites mean nothing, refused before any training
    from emlens.interventions import SteeringVector

    elsewhere = SteeringVector.from_vector(torch.randn(64), 1).save(tmp_path / "layer1")
    assert main(["drift", "--model", str(tiny_checkpoint), "--data", "medical_harmful", "--steps", "5",
                 "--general", str(elsewhere), "--out", str(tmp_path / "x.png")]) == 2
    assert "acts at blocks.1.hook_resid_post, but this run trains at blocks.2.hook_resid_post" in capsys.readouterr().err
    assert not (tmp_path / "x_runs").exists()
    # a second drift with the same --out stem (another figure suffix) would overwrite the first one's numbers and
    # runs: refused for its numbers; with those moved away, for its runs
    again = ["drift", "--model", str(tiny_checkpoint), "--data", "medical_harmful", "--steps", "5", "--out", str(tmp_path / "drift.pdf")]
    assert main(again) == 2
    assert "drift.json holds the numbers of drift.png" in capsys.readouterr().err
    png.with_suffix(".json").rename(tmp_path / "kept.json")
    assert main(again) == 2
    assert "drift_runs already holds the runs of an earlier drift" in capsys.readouterr().err
    out = tmp_path / "eval"
    assert main(["evaluate", "--model", str(tiny_checkpoint), "--intervention", general, "--local-judge",
                 "--n-samples", "1", "--max-new-tokens", "4", "--out", str(out)]) == 0
    report = json.loads((out / "results.json").read_text())
    assert report["n_answers"] == 8 and "misaligned_rate" in report["rates"]
    assert "EM rate" in capsys.readouterr().out


def test_cli_drift_trains_an_adapter_with_the_papers_adapter_settings(tiny_checkpoint, two_vectors, tmp_path, capsys):
    """``emlens drift --kind adapter``: a rank-1 adapter's narrow run and its continuation, at the study's adapter defaults
    (lr 2e-5, λ 0.66); a --general of another kind is refused before any training, naming both kinds."""
    png = tmp_path / "drift_adapter.png"
    assert main(["drift", "--model", str(tiny_checkpoint), "--data", "medical_harmful", "--steps", "4", "--kind", "adapter",
                 "--batch-size", "2", "--out", str(png)]) == 0
    result = json.loads(png.with_suffix(".json").read_text())
    assert result["measure"] == "drift" and len(result["coordinates"]) == 3  # steps 0, 4 (KL) and 8 (no KL)
    runs = tmp_path / "drift_adapter_runs"
    narrow = json.loads((runs / "narrow" / "config.json").read_text())
    continued = json.loads((runs / "continued" / "config.json").read_text())
    from emlens import Intervention

    assert Intervention.load(runs / "continued" / "intervention.safetensors").kind == "rank_one_adapter"
    assert (narrow["lr"], narrow["kl_weight"]) == (2e-5, 0.66) and (continued["lr"], continued["kl_weight"]) == (2e-5, 0.0)
    general = two_vectors[0].split("=", 1)[1]
    code = main(["drift", "--model", str(tiny_checkpoint), "--data", "medical_harmful", "--steps", "4", "--kind", "adapter",
                 "--general", general, "--out", str(tmp_path / "mixed.png")])
    assert code != 0 and "one PCA needs one kind" in capsys.readouterr().err
