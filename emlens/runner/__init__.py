"""How a model is executed: one runner per model picks the path for every consumer.

Everything emlens does beneath TransformerLens lives here: unwrapping the bridge into plain
transformers modules (:mod:`~emlens.runner.plain`), each architecture's quirks
(:mod:`~emlens.runner.architectures`), padding-free blocks and compilation
(:mod:`~emlens.runner.packed`), residual caches (:mod:`~emlens.runner.caches`), dataset
losses and KLs for sweeps (:mod:`~emlens.runner.measure`), cached decoding
(:mod:`~emlens.runner.sampling`) and activation collection. See ``docs/runner.md``.
"""

from emlens.runner.architectures import PROVED_MODEL_TYPES, Architecture
from emlens.runner.caches import ExampleResiduals, ResidualStore, dataset_fingerprint
from emlens.runner.core import Plan, Runner, runner_for
from emlens.runner.measure import acts_alike, kl_sweep, loss_sweep
from emlens.runner.sampling import SamplingSettings, generate

__all__ = [
    "PROVED_MODEL_TYPES",
    "Architecture",
    "ExampleResiduals",
    "ResidualStore",
    "dataset_fingerprint",
    "Plan",
    "Runner",
    "runner_for",
    "acts_alike",
    "kl_sweep",
    "loss_sweep",
    "SamplingSettings",
    "generate",
]
