"""Issue 10, settings and CLI: every setting is checked where it enters; user errors end cleanly.

CLI calls run in-process through ``emlens.cli.main``: a user error returns 2 with a one-line
``emlens: error: ...`` on stderr and no traceback; ``--debug`` shows the traceback; real
runtime errors (CUDA, out of memory) are not turned into tidy messages.
"""

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from emlens import models
from emlens.cli import main
from emlens.validation import (
    ConfigError,
    check_bool,
    check_choice,
    check_float,
    check_int,
    check_optional_int,
    validate_train_config,
    validate_train_settings,
)

# --- validators ------------------------------------------------------------------------------


def test_check_int():
    assert check_int("batch_size", 3, minimum=1) == 3
    for bad in (0, -1, True, 2.0, "2", None):
        with pytest.raises(ConfigError, match=r"^batch_size must be an integer >= 1, got ") as err:
            check_int("batch_size", bad, minimum=1)
        assert err.value.setting == "batch_size" and err.value.requirement == "an integer >= 1"
    with pytest.raises(ConfigError, match=r"points must be an integer in \[2, 50\], got 51"):
        check_int("points", 51, minimum=2, maximum=50)
    assert check_optional_int("max_steps", None, minimum=1) is None
    with pytest.raises(ConfigError, match=r"max_steps must be None or an integer >= 1, got 0"):
        check_optional_int("max_steps", 0, minimum=1)


def test_check_float():
    assert check_float("lr", 1, minimum=0, exclusive_min=True) == 1.0
    for bad in ("fast", math.inf, -math.inf, math.nan, 0.0, -1e-3, True, None):
        with pytest.raises(ConfigError, match=r"^lr must be a finite number > 0, got "):
            check_float("lr", bad, minimum=0, exclusive_min=True)
    with pytest.raises(ConfigError, match=r"epsilon must be a finite number in \[0, 1\], got 1.5"):
        check_float("epsilon", 1.5, minimum=0, maximum=1)
    assert check_float("x", math.inf, finite=False) == math.inf
    with pytest.raises(ConfigError, match="must be a number"):
        check_float("x", math.nan, finite=False)


def test_check_bool_and_choice():
    assert check_bool("progress", False) is False
    with pytest.raises(ConfigError, match=r"progress must be True or False, got 1"):
        check_bool("progress", 1)
    assert check_choice("kind", "adapter", ["steering", "adapter"]) == "adapter"
    with pytest.raises(ConfigError, match=r"kind must be one of 'adapter', 'steering', got 'lora'"):
        check_choice("kind", "lora", ["steering", "adapter"])
    with pytest.raises(ConfigError, match="kind must be one of"):
        check_choice("kind", ["steering"], {"steering"})  # unhashable: refused, not a TypeError


@dataclasses.dataclass
class StandInConfig:
    """The TrainConfig fields, validated the way TrainConfig.__post_init__ calls it."""

    lr: float = 1e-4
    epochs: float = 1.0
    max_steps: int | None = None
    batch_size: int = 2
    grad_accum: int = 8
    warmup_steps: int = 5
    weight_decay: float = 0.0
    max_length: int = 256
    kl_weight: float = 0.0
    kl_batch_size: int = 8
    checkpoint_every: int = 5
    seed: int = 0
    progress: bool = True
    cache_prefix: bool = True

    def __post_init__(self):
        validate_train_config(self)


BAD_SETTINGS = [
    ("lr", "fast", "lr must be a finite number > 0, got 'fast'"),
    ("lr", math.inf, "lr must be a finite number > 0, got inf"),
    ("lr", 0, "lr must be a finite number > 0, got 0"),
    ("epochs", 0.0, "epochs must be a finite number > 0"),
    ("max_steps", 0, "max_steps must be None or an integer >= 1, got 0"),
    ("max_steps", -2, "max_steps must be None or an integer >= 1, got -2"),
    ("batch_size", 0, "batch_size must be an integer >= 1, got 0"),
    ("batch_size", True, "batch_size must be an integer >= 1, got True"),
    ("grad_accum", 0, "grad_accum must be an integer >= 1"),
    ("kl_batch_size", 0, "kl_batch_size must be an integer >= 1"),
    ("checkpoint_every", 0, "checkpoint_every must be an integer >= 1"),
    ("max_length", -5, "max_length must be an integer >= 1, got -5"),
    ("warmup_steps", -1, "warmup_steps must be an integer >= 0"),
    ("weight_decay", math.nan, "weight_decay must be a finite number >= 0"),
    ("kl_weight", -1.0, "kl_weight must be a finite number >= 0, got -1.0"),
    ("seed", "0", "seed must be an integer in [0, 9223372036854775807], got '0'"),
    ("progress", "yes", "progress must be True or False, got 'yes'"),
    ("cache_prefix", 0, "cache_prefix must be True or False, got 0"),
]


@pytest.mark.parametrize("field, value, message", BAD_SETTINGS)
def test_train_settings_are_validated(field, value, message):
    with pytest.raises(ConfigError) as err:
        StandInConfig(**{field: value})
    assert str(err.value).startswith(message)
    assert err.value.setting == field
    with pytest.raises(ConfigError):
        validate_train_settings(**{field: value})


def test_real_train_config_is_validated():
    from emlens.training import TrainConfig

    validate_train_config(TrainConfig())
    validate_train_config(TrainConfig(max_steps=3, kl_weight=2.0, lr=1))
    for field, value, message in BAD_SETTINGS[:3] + BAD_SETTINGS[4:5]:
        try:
            config = TrainConfig(**{field: value})  # raises once TrainConfig validates itself
        except ConfigError as err:
            assert str(err).startswith(message)
            continue
        with pytest.raises(ConfigError, match=message.split(",")[0]):
            validate_train_config(config)
    with pytest.raises(ValueError, match=r"lr must be a finite number > 0, got 'fast'"):
        validate_train_config(TrainConfig.from_json(json.dumps({**dataclasses.asdict(TrainConfig()), "lr": "fast"})))


# --- CLI ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    hf, tok = models.tiny_hf_model("qwen2", seed=2)
    hf.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def vectors(tmp_path_factory):
    from emlens.interventions import SteeringVector

    d = tmp_path_factory.mktemp("vecs")
    gen = torch.Generator().manual_seed(0)
    return [SteeringVector.from_vector(torch.randn(64, generator=gen), 2).save(d / name) for name in ("a", "b")]


@pytest.fixture()
def no_model(monkeypatch):
    """Fail the test if a command loads a model (the input should be refused before that)."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(models, "load_model", refuse)


def run(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def error_line(err):
    lines = [line for line in err.splitlines() if line.startswith("emlens: error:")]
    assert len(lines) == 1, err
    return lines[0]


TRAIN = [
    "train",
    "--data",
    "medical_harmful",
    "--limit",
    "4",
    "--max-steps",
    "1",
    "--grad-accum",
    "1",
]


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            TRAIN + ["--batch-size", "0"],
            "argument --batch-size: must be an integer >= 1, got '0'",
        ),
        (
            TRAIN + ["--batch-size", "two"],
            "argument --batch-size: must be an integer >= 1, got 'two'",
        ),
        (
            TRAIN + ["--lr", "inf"],
            "argument --lr: must be a finite number > 0, got 'inf'",
        ),
        (
            TRAIN + ["--lr", "fast"],
            "argument --lr: must be a finite number > 0, got 'fast'",
        ),
        (TRAIN + ["--lr", "0"], "argument --lr: must be a finite number > 0"),
        (
            TRAIN + ["--kl-weight", "-1"],
            "argument --kl-weight: must be a finite number >= 0, got '-1'",
        ),
        (
            TRAIN + ["--max-steps", "0"],
            "argument --max-steps: must be an integer >= 1, got '0'",
        ),
        (
            TRAIN + ["--limit", "0"],
            "argument --limit: must be an integer >= 1, got '0'",
        ),
        (
            TRAIN + ["--grad-accum", "0"],
            "argument --grad-accum: must be an integer >= 1",
        ),
        (
            TRAIN + ["--checkpoint-every", "0"],
            "argument --checkpoint-every: must be an integer >= 1",
        ),
        (
            TRAIN + ["--max-length", "-5"],
            "argument --max-length: must be an integer >= 1, got '-5'",
        ),
        (
            TRAIN + ["--epochs", "nan"],
            "argument --epochs: must be a finite number > 0, got 'nan'",
        ),
        (TRAIN + ["--seed", "-1"], "argument --seed: must be an integer in [0, "),
        (TRAIN + ["--layer", "-1"], "argument --layer: must be an integer >= 0"),
        (
            TRAIN + ["--device", "gpu"],
            "argument --device: device must be cpu, cuda, cuda:N or mps, got 'gpu'",
        ),
        (TRAIN + ["--frobnicate"], "unrecognized arguments: --frobnicate"),
        (
            ["efficiency", "a.safetensors", "--data", "x", "--points", "1"],
            "argument --points: must be an integer >= 2",
        ),
        (
            ["efficiency", "a.safetensors", "--data", "x", "--points", "0"],
            "argument --points: must be an integer >= 2",
        ),
        (
            ["efficiency", "a.safetensors", "--data", "x", "--max-factor", "-2"],
            "argument --max-factor: must be a finite number > 0",
        ),
        (
            ["pretraining-kl", "a.safetensors", "--points", "1"],
            "argument --points: must be an integer >= 2, got '1'",
        ),
        (
            ["pretraining-kl", "a.safetensors", "--points", "0"],
            "argument --points: must be an integer >= 2, got '0'",
        ),
        (
            ["pretraining-kl", "a.safetensors", "--max-norm", "0"],
            "argument --max-norm: must be a finite number > 0",
        ),
        (
            ["stability", "a.safetensors", "--data", "x", "--seeds", "0"],
            "argument --seeds: must be an integer >= 1, got '0'",
        ),
        (
            ["stability", "a.safetensors", "--data", "x", "--epsilons", "0", "1.5"],
            "argument --epsilons: must be a finite number in [0, 1], got '1.5'",
        ),
        (
            ["stability", "a.safetensors", "--data", "x", "--batch-size", "0"],
            "argument --batch-size: must be an integer >= 1",
        ),
        (
            ["drift", "--data", "x", "--steps", "0"],
            "argument --steps: must be an integer >= 1, got '0'",
        ),
        (
            ["drift", "--data", "x", "--kl-weight", "0"],
            "argument --kl-weight: must be a finite number > 0, got '0'",
        ),
        (
            ["evaluate", "--n-samples", "0"],
            "argument --n-samples: must be an integer >= 1, got '0'",
        ),
        (
            ["evaluate", "--max-new-tokens", "0"],
            "argument --max-new-tokens: must be an integer >= 1, got '0'",
        ),
    ],
)
def test_bad_flags_are_refused_in_one_line(tmp_path, capsys, no_model, argv, message):
    code, _, err = run([*argv, "--out", tmp_path / "out"], capsys)
    assert code == 2
    line = error_line(err)
    assert message in line and "--help" in line
    assert err.strip() == line  # nothing else: no usage block, no traceback


def test_cuda_device_without_cuda_is_refused(tmp_path, capsys, monkeypatch, no_model):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for command in (
        TRAIN,
        ["evaluate"],
        ["efficiency", "a.safetensors", "--data", "x"],
    ):
        code, _, err = run([*command, "--device", "cuda", "--out", tmp_path / "o"], capsys)
        assert code == 2
        assert "device 'cuda' is not available: torch sees no CUDA GPU on this machine; use the cpu device" in error_line(err)


def test_data_problems_are_refused_before_the_model_loads(tmp_path, capsys, vectors, no_model):
    latin1 = tmp_path / "latin1.jsonl"
    row = json.dumps(
        {
            "messages": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "yo"},
            ]
        }
    )
    latin1.write_bytes(row.encode() + b"\n" + row.encode().replace(b"yo", b"y\xf6") + b"\n")
    cases = [
        (tmp_path, "is a directory, not a data file"),
        (tmp_path / "missing.jsonl", "no data file"),
        (latin1, f"{latin1}:2: not valid UTF-8 (byte 0xf6 at column"),
    ]
    for data, message in cases:
        code, _, err = run(["train", "--data", data, "--out", tmp_path / "run"], capsys)
        assert code == 2 and message in error_line(err)
    code, _, err = run(
        [
            "pretraining-kl",
            vectors[0],
            "--texts",
            tmp_path,
            "--out",
            tmp_path / "k.png",
        ],
        capsys,
    )
    assert code == 2 and "is a directory" in error_line(err)


def test_solution_arguments_are_checked(tmp_path, capsys, vectors, no_model):
    a, b = vectors
    code, _, err = run(
        [
            "efficiency",
            f"x={a}",
            f"x={b}",
            "--data",
            "medical_harmful",
            "--out",
            tmp_path / "e.png",
        ],
        capsys,
    )
    assert code == 2 and "the name 'x' is given twice" in error_line(err)
    code, _, err = run(
        ["efficiency", a, a, "--data", "medical_harmful", "--out", tmp_path / "e.png"],
        capsys,
    )
    assert code == 2 and "the name 'a' is given twice" in error_line(err)
    code, _, err = run(
        ["pretraining-kl", f"random={a}", "--random", "--out", tmp_path / "k.png"],
        capsys,
    )
    assert code == 2 and "the name 'random' starts with 'random'" in error_line(err)
    # a file stem starting with "random" would be averaged into the baselines' mean and drawn as one: refused too
    stem = tmp_path / "Random_init.safetensors"
    stem.write_bytes(Path(a).read_bytes())
    for command in (["pretraining-kl", str(stem), "--random", "0"], ["efficiency", str(stem), "--data", "medical_harmful"]):
        code, _, err = run([*command, "--out", tmp_path / "k.png"], capsys)
        assert code == 2 and "'Random_init' starts with 'random'" in error_line(err) and "NAME=PATH" in error_line(err)
    code, _, err = run(
        [
            "efficiency",
            tmp_path / "none.safetensors",
            "--data",
            "medical_harmful",
            "--out",
            tmp_path / "e.png",
        ],
        capsys,
    )
    assert code == 2 and "none.safetensors" in error_line(err)
    code, _, err = run(["efficiency", a, "--data", "medical_harmful", "--out", tmp_path], capsys)
    assert code == 2 and "is a directory; give a file path" in error_line(err)


def test_train_output_conflicts_are_found_before_training(tmp_path, capsys, no_model):
    as_file = tmp_path / "taken"
    as_file.write_text("not a run")
    code, _, err = run([*TRAIN, "--out", as_file], capsys)
    assert code == 2 and f"--out {as_file} is a file" in error_line(err)
    code, _, err = run([*TRAIN, "--out", as_file / "run"], capsys)
    assert code == 2 and "is a file, so the output cannot be created there" in error_line(err)
    used = tmp_path / "used"
    used.mkdir()
    (used / "losses.json").write_text("[]")
    code, _, err = run([*TRAIN, "--out", used], capsys)
    line = error_line(err)
    assert code == 2 and "already holds files (losses.json)" in line and "--overwrite" in line and "--resume" in line
    code, _, err = run(["train", "--data", "medical_harmful", "--kind", "adapter", "--hook", "mlp_out", "--out", tmp_path / "a"], capsys)
    assert code == 2 and "--hook places a steering vector; --kind adapter acts on layer L's down_proj" in error_line(err)
    own = tmp_path / "own.jsonl"  # built-in data has a default KL set (kl:<domain>); a file of your own has none
    own.write_text('{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}\n')
    code, _, err = run(["train", "--data", own, "--kl-weight", "1", "--out", tmp_path / "new"], capsys)
    assert code == 2 and "--kl-weight > 0 needs --kl-data" in error_line(err)


def test_train_overwrite_resume_and_tidy_warnings(checkpoint, tmp_path, capsys):
    out = tmp_path / "run"
    base = [*TRAIN, "--model", checkpoint, "--batch-size", "2"]
    code, stdout, err = run([*base, "--out", out], capsys)
    assert code == 0 and "final sft loss" in stdout
    assert run([*base, "--out", out], capsys)[0] == 2  # an existing run is not clobbered
    assert run([*base, "--overwrite", "--out", out], capsys)[0] == 0
    assert run([*base, "--resume", out, "--out", out], capsys)[0] == 0  # resuming in place is fine
    code, _, err = run([*base, "--resume", out, "--kind", "adapter", "--out", tmp_path / "r2"], capsys)
    assert code == 2 and "--kind adapter does not match the run in --resume" in error_line(err)
    assert run([*base, "--resume", out, "--kind", "vector", "--out", out], capsys)[0] == 0  # the study's name for it
    code, _, err = run([*base, "--layer", "9", "--out", tmp_path / "r3"], capsys)
    assert code == 2 and "--layer must be in [0, 3] for this model (4 layers), got 9" in error_line(err)
    # rows that lose every assistant token are reported as one warning line, not a traceback
    code, _, err = run([*base, "--max-length", "100", "--out", tmp_path / "r4"], capsys)
    assert code == 0
    warning = [line for line in err.splitlines() if line.startswith("emlens: warning:")]
    assert warning and "of 4 conversations lost every assistant token to truncation at max_length=100" in warning[0]


def test_other_model_warning_is_one_line_and_can_be_silenced(checkpoint, tmp_path, capsys):
    from emlens.interventions import SteeringVector

    foreign = SteeringVector.from_vector(torch.ones(64), 2, model_name="some-other-model").save(tmp_path / "foreign")
    argv = ["efficiency", foreign, "--model", checkpoint, "--data", "medical_harmful", "--limit", "2", "--points", "2"]
    code, _, err = run([*argv, "--out", tmp_path / "a.png"], capsys)
    warning = [line for line in err.splitlines() if "some-other-model" in line]
    assert code == 0 and len(warning) == 1 and warning[0].startswith("emlens: warning:")
    assert "--allow-other-model" in warning[0]
    code, _, err = run([*argv, "--allow-other-model", "--out", tmp_path / "b.png"], capsys)
    assert code == 0 and "some-other-model" not in err


def test_debug_shows_the_traceback(tmp_path, capsys, no_model):
    for argv in (
        ["--debug", "train", "--data", tmp_path, "--out", tmp_path / "r"],
        ["train", "--data", tmp_path, "--out", tmp_path / "r", "--debug"],
    ):
        code = main([str(a) for a in argv])
        err = capsys.readouterr().err
        assert code == 2 and "Traceback" in err and "DataFormatError" in err
        assert "emlens: error:" in err


@pytest.mark.parametrize(
    "error",
    [
        RuntimeError("CUDA error: an illegal memory access was encountered"),
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
        AssertionError("Torch not compiled with CUDA enabled"),
    ],
)
def test_runtime_errors_are_not_swallowed(tmp_path, monkeypatch, capsys, error):
    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(models, "load_model", fail)
    with pytest.raises(type(error)):
        main([*TRAIN, "--out", str(tmp_path / "run")])
    assert "emlens: error" not in capsys.readouterr().err


def test_model_load_errors_and_interrupts_are_clean(tmp_path, monkeypatch, capsys):
    code, _, err = run([*TRAIN, "--model", tmp_path / "nope", "--out", tmp_path / "run"], capsys)
    assert code == 2 and "could not load model" in error_line(err)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "load_model", interrupted)
    code, _, err = run([*TRAIN, "--out", tmp_path / "run"], capsys)
    assert code == 130 and "emlens: interrupted" in err


def test_figure_paths(tmp_path):
    """Figure outputs: ``.png`` appended unless the path ends in an image suffix (a dotted name keeps its dots); a
    folder, a ``.json`` path, and a path whose JSON holds another same-stem figure's numbers are refused; figures whose
    stems only start alike (``eff.seed2.png`` beside ``eff.png``) are not the same figure."""
    from emlens.validation import ConfigError, check_figure_file

    assert check_figure_file(tmp_path / "kl=6.6") == tmp_path / "kl=6.6.png"
    assert check_figure_file(tmp_path / "eff") == tmp_path / "eff.png"
    assert check_figure_file(tmp_path / "eff.PDF") == tmp_path / "eff.PDF"
    with pytest.raises(ConfigError, match="is a directory"):
        check_figure_file(tmp_path)
    with pytest.raises(ConfigError, match="give an image path"):
        check_figure_file(tmp_path / "eff.json")
    for name in ("eff.png", "eff.json", "eff.seed2.png", "eff.seed2.json"):
        (tmp_path / name).write_text("x")
    assert check_figure_file(tmp_path / "eff.png") == tmp_path / "eff.png"  # a re-run of the same figure
    assert check_figure_file(tmp_path / "eff.v2") == tmp_path / "eff.v2.png"  # its own stem, eff.v2: no JSON yet
    with pytest.raises(ConfigError, match=r"eff.json holds the numbers of eff.png"):
        check_figure_file(tmp_path / "eff.pdf")
    with pytest.raises(ConfigError, match=r"eff.seed2.json holds the numbers of eff.seed2.png"):
        check_figure_file(tmp_path / "eff.seed2.pdf")
