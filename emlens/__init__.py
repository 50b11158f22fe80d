"""emlens: the geometry of general vs narrow misalignment, through TransformerLens hooks.

Reproduces and extends "Emergent Misalignment is Easy, Narrow Misalignment is Hard"
(Soligo, Turner, Rajamanoharan, Nanda, 2026).
"""

from emlens.data import ChatBatch, TokenDataset, builtin_datasets, read_conversations, read_texts
from emlens.directions import MeanDifference, directions_from_evaluation, mean_difference_directions, select_answers
from emlens.geometry import cosine_similarity, cosine_similarity_matrix, mean_difference_direction, orthogonal_noise, pca
from emlens.hub import pull_intervention, push_intervention
from emlens.interventions import (
    Composed,
    DirectionAblation,
    Intervention,
    LoRAAdapter,
    MultiLayerSteering,
    RankOneAdapter,
    SteeringVector,
    load_intervention,
    perturb,
    project_out_of_adapter,
    random_direction_like,
)
from emlens.models import default_layer, load_model, tiny_model
from emlens.runner import Plan, runner_for
from emlens.runner.activations import collect_activations
from emlens.training import TrainConfig, TrainingCaches, TrainingResult, evaluate_loss, kl_to_base, train

__all__ = [
    "ChatBatch",
    "TokenDataset",
    "builtin_datasets",
    "read_conversations",
    "read_texts",
    "cosine_similarity",
    "cosine_similarity_matrix",
    "mean_difference_direction",
    "orthogonal_noise",
    "pca",
    "perturb",
    "Intervention",
    "RankOneAdapter",
    "SteeringVector",
    "LoRAAdapter",
    "MultiLayerSteering",
    "DirectionAblation",
    "Composed",
    "project_out_of_adapter",
    "load_intervention",
    "random_direction_like",
    "Plan",
    "runner_for",
    "collect_activations",
    "default_layer",
    "load_model",
    "tiny_model",
    "TrainConfig",
    "TrainingCaches",
    "TrainingResult",
    "evaluate_loss",
    "kl_to_base",
    "train",
    "MeanDifference",
    "directions_from_evaluation",
    "mean_difference_directions",
    "select_answers",
    "pull_intervention",
    "push_intervention",
]
