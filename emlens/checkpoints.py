"""Training runs on disk: every checkpoint written atomically, and an exact resume.

A run directory holds ``checkpoint/`` with everything needed to continue bit for bit: the
intervention, optimizer and scheduler states, RNG states, the data position, the losses and
trajectory so far, and a ``run.json`` saying what is being trained (config, intervention kind
and settings, model, data fingerprints) so that a resume of something else is refused. A
checkpoint is written to ``checkpoint.partial/`` and swapped into place with renames, so an
interruption at any moment leaves the previous checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from emlens.runner.caches import dataset_fingerprint

CHECKPOINT = "checkpoint"


@dataclass
class SavedState:
    """What :meth:`RunCheckpoints.restore` hands back to :func:`~emlens.training.train`."""

    step: int
    start_step: int  # the step number before this run's first step (a continuation's earlier phases)
    losses: list[dict[str, float | int]]
    trajectory: list[tuple[int, dict[str, Tensor]]]


class RunCheckpointError(ValueError):
    """A run directory conflicts with the run asked for, or holds an unreadable checkpoint."""


def weights_fingerprint(model: Any, per_tensor: int = 64) -> str:
    """A hash of the model's parameters' names, dtypes, shapes and ``per_tensor`` evenly spaced values of each: another
    checkpoint at the same path, or the same one loaded in another dtype, gives another hash (one device sync)."""
    import hashlib

    names, samples = [], []
    for name, param in model.named_parameters():
        flat = param.detach().reshape(-1)
        samples.append(flat[:: max(1, flat.numel() // per_tensor)][:per_tensor].float())
        names.append(f"{name}:{param.dtype}:{tuple(param.shape)}")
    digest = hashlib.sha256("\n".join(names).encode())
    if samples:
        digest.update(torch.cat([s.to(samples[0].device) for s in samples]).cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def _describe(config: Any, intervention: Any, model: Any, dataset: Any, kl_dataset: Any | None) -> dict[str, Any]:
    settings = dataclasses.asdict(config)
    settings.pop("progress", None)  # display only
    return {
        "config": settings,
        "intervention": {k: v for k, v in intervention.metadata().items() if k != "model_name"},
        "model": {"name": getattr(getattr(model, "cfg", None), "model_name", None), "weights": weights_fingerprint(model)},
        "data": dataset_fingerprint(dataset),
        "kl_data": dataset_fingerprint(kl_dataset) if kl_dataset is not None else None,
    }


class RunCheckpoints:
    """The checkpoints of one training run in ``directory``; conflicts are raised on construction."""

    def __init__(
        self, directory: str | Path, config: Any, intervention: Any, model: Any, dataset: Any, kl_dataset: Any | None, resume: bool
    ):
        self.directory = Path(directory)
        if self.directory.exists() and not self.directory.is_dir():
            raise RunCheckpointError(f"run directory {self.directory} is a file; pass a directory")
        self.run = _describe(config, intervention, model, dataset, kl_dataset)
        self._lock = self._take_lock()
        try:
            self._check(resume)
        except BaseException:
            self.close()
            raise

    def _take_lock(self) -> Any:
        """An exclusive lock on the run directory, held until :meth:`close`: two runs never share one."""
        import fcntl

        self.directory.mkdir(parents=True, exist_ok=True)
        handle = (self.directory / ".lock").open("a")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            raise RunCheckpointError(
                f"another training run is using {self.directory} right now; wait for it to finish or choose another directory"
            ) from None
        return handle

    def close(self) -> None:
        """Release the run directory's lock."""
        if self._lock is not None:
            self._lock.close()  # closing the file releases the flock
            self._lock = None

    def _check(self, resume: bool) -> None:
        self._recover()
        if self.has_checkpoint():
            if not resume:
                raise RunCheckpointError(
                    f"{self.directory} already holds a training checkpoint; pass resume=True (CLI: --resume) to continue it, "
                    "or choose another directory"
                )
            run_file = self.path / "run.json"
            try:
                saved = json.loads(run_file.read_text())
                if not isinstance(saved, dict):
                    raise ValueError("not a JSON object")
            except (OSError, UnicodeDecodeError, ValueError) as err:
                raise RunCheckpointError(f"{run_file} cannot be read ({err}); remove {self.path} to start over") from err
            for key in ("intervention", "model", "data", "kl_data", "config"):
                if saved.get(key) != self.run[key]:
                    raise RunCheckpointError(
                        f"cannot resume {self.directory}: its {key.replace('_', ' ')} differs from this run's "
                        f"(saved {saved.get(key)!r}, now {self.run[key]!r})"
                    )

    @property
    def path(self) -> Path:
        return self.directory / CHECKPOINT

    def has_checkpoint(self) -> bool:
        return (self.path / "state.pt").exists()

    def _recover(self) -> None:
        """Finish a swap that an interruption cut short; drop a half-written checkpoint."""
        old = self.directory / f"{CHECKPOINT}.old"
        if old.exists():
            if self.path.exists():
                shutil.rmtree(old)
            else:
                old.rename(self.path)
        shutil.rmtree(self.directory / f"{CHECKPOINT}.partial", ignore_errors=True)

    def write(
        self, step: int, start_step: int, intervention: Any, optimizer: Any, scheduler: Any, sft: Any, kl: Any | None, result: Any
    ) -> None:
        """Write the state after ``step`` steps of this run, atomically."""
        partial = self.directory / f"{CHECKPOINT}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        intervention.save(partial / "intervention.safetensors")
        state = {
            "step": step,
            "start_step": start_step,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": {
                "python": random.getstate(),
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            },
            "data": {"sft": sft.position(), "kl": kl.position() if kl is not None else None},
            "losses": result.losses,
            "trajectory": result.trajectory,
        }
        torch.save(state, partial / "state.pt")
        (partial / "run.json").write_text(json.dumps(self.run, indent=2))
        for f in partial.iterdir():
            with f.open("rb") as fh:
                os.fsync(fh.fileno())
        old = self.directory / f"{CHECKPOINT}.old"
        if self.path.exists():
            self.path.rename(old)
        partial.rename(self.path)
        shutil.rmtree(old, ignore_errors=True)

    def restore(self, intervention: Any, optimizer: Any, scheduler: Any, sft: Any, kl: Any | None) -> SavedState | None:
        """Load the last checkpoint into the run's objects (None when there is none yet)."""
        if not self.has_checkpoint():
            return None
        from emlens.interventions import Intervention

        try:
            saved = Intervention.load(self.path / "intervention.safetensors", device="cpu")
            state = torch.load(self.path / "state.pt", weights_only=False)
        except Exception as err:  # noqa: BLE001 - any unreadable file is the same problem for the user
            raise RunCheckpointError(f"the checkpoint in {self.path} cannot be read ({err}); remove it to start over") from err
        with torch.no_grad():
            for name, tensor in intervention.state_dict().items():
                tensor.copy_(saved.state_dict()[name])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        random.setstate(state["rng"]["python"])
        torch.set_rng_state(state["rng"]["torch"])
        if state["rng"]["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        sft.epoch, sft.offset = state["data"]["sft"]["epoch"], state["data"]["sft"]["offset"]
        if kl is not None and state["data"]["kl"] is not None:
            kl.epoch, kl.offset = state["data"]["kl"]["epoch"], state["data"]["kl"]["offset"]
        losses = list(state["losses"])
        # checkpoints written before start_step was stored: the last loss's label minus the steps of this phase
        start = state.get("start_step", int(losses[-1]["step"]) - int(state["step"]) if losses else 0)
        return SavedState(int(state["step"]), int(start), losses, list(state["trajectory"]))
