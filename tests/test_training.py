import pytest
import torch

from emlens.data import TokenDataset, collate
from emlens.interventions import RankOneAdapter, SteeringVector
from emlens.scoring import kl_per_token, masked_mean, nll_per_token, nll_sum
from emlens.training import TrainConfig, TrainingResult, evaluate_loss, kl_to_base, train

FAST = dict(batch_size=2, grad_accum=1, warmup_steps=1, progress=False, checkpoint_every=2)


def token_losses(model, batch):
    """Next-token losses at every position [batch, seq-1], through the hooked bridge, and the scored mask."""
    logits = model(batch.input_ids, attention_mask=batch.attention_mask)[:, :-1]
    losses = nll_per_token(logits.reshape(-1, logits.shape[-1]), batch.input_ids[:, 1:].reshape(-1))
    return losses.view(batch.input_ids.shape[0], -1), batch.scored


def test_sft_gradient_reaches_vector_and_adapter(model, dataset):
    batch = next(dataset.batches(4))
    for intervention, param in [(SteeringVector.for_model(model, 1), "vector"), (RankOneAdapter.for_model(model, 1), "b")]:
        with intervention.applied(model):
            logits = model(batch.input_ids, attention_mask=batch.attention_mask)
            nll_sum(logits[batch.scored_positions], batch.scored_targets).backward()
        grad = getattr(intervention, param).grad
        assert grad is not None and grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())  # the model stays frozen


def test_loss_counts_only_assistant_tokens(model, dataset):
    batch = next(dataset.batches(4))
    logits = model(batch.input_ids, attention_mask=batch.attention_mask)
    mask = batch.scored_positions
    assert int(mask.sum()) == batch.n_loss_tokens
    corrupted = logits.clone()
    corrupted[~mask] += 100 * torch.randn_like(corrupted[~mask])
    torch.testing.assert_close(nll_sum(corrupted[mask], batch.scored_targets), nll_sum(logits[mask], batch.scored_targets))


def test_batch_invariance(model, dataset):
    """One example alone and inside a padded batch give the same per-token losses."""
    vec = SteeringVector.from_vector(torch.randn(model.cfg.d_model), 1)
    batch = collate(dataset.examples, dataset.pad_token_id)
    with vec.applied(model):
        batch_losses, batch_mask = token_losses(model, batch)
        for row, example in enumerate(dataset.examples):
            alone = collate([example], dataset.pad_token_id)
            losses, mask = token_losses(model, alone)
            n = mask.shape[1]
            torch.testing.assert_close(batch_losses[row, :n][mask[0]], losses[0][mask[0]], atol=1e-5, rtol=1e-5)
            assert not batch_mask[row, n:].any()
    per_example = [evaluate_loss(model, dataset.subset([i]), vec) for i in range(len(dataset))]
    weights = [sum(e.loss_mask[1:]) for e in dataset.examples]
    pooled = sum(l * w for l, w in zip(per_example, weights)) / sum(weights)
    assert evaluate_loss(model, dataset, vec, batch_size=3) == pytest.approx(pooled, rel=1e-5)


def test_kl_is_zero_at_zero_vector_and_positive_otherwise(model, dataset):
    batch = next(dataset.batches(4))
    assert kl_to_base(model, SteeringVector.for_model(model, 1), batch) == 0.0
    assert kl_to_base(model, SteeringVector.from_vector(torch.randn(model.cfg.d_model), 1), batch) > 0


def test_kl_ignores_padding(model, dataset):
    """The KL over a padded batch is the token-weighted mean of the per-example KLs."""
    vec = SteeringVector.from_vector(torch.randn(model.cfg.d_model), 2)
    batch_kl = kl_to_base(model, vec, collate(dataset.examples, dataset.pad_token_id))
    per = [kl_to_base(model, vec, collate([e], dataset.pad_token_id)) for e in dataset.examples]
    lengths = [len(e.input_ids) for e in dataset.examples]
    assert batch_kl == pytest.approx(sum(k * n for k, n in zip(per, lengths)) / sum(lengths), rel=1e-5)


def test_kl_formula():
    base = torch.tensor([[[0.0, 1.0, 2.0]]])
    other = torch.tensor([[[2.0, 1.0, 0.0]]])
    p, q = base.softmax(-1), other.softmax(-1)
    expected = (p * (p.log() - q.log())).sum()
    torch.testing.assert_close(kl_per_token(base, other)[0, 0], expected)
    assert masked_mean(torch.tensor([[1.0, 3.0]]), torch.tensor([[1, 0]])).item() == 1.0


@pytest.mark.parametrize("kind", ["steering", "adapter"])
def test_training_lowers_loss_and_records_trajectory(model, dataset, kind):
    intervention = SteeringVector.for_model(model, 1) if kind == "steering" else RankOneAdapter.for_model(model, 1)
    before = evaluate_loss(model, dataset)
    lr = 2e-3
    result = train(model, intervention, dataset, TrainConfig(lr=lr, max_steps=12, **FAST))
    after = evaluate_loss(model, dataset, intervention)
    assert after < before - 0.05
    assert [s for s, _ in result.trajectory] == [0, 2, 4, 6, 8, 10, 12]
    assert len(result.losses) == 12 and result.losses[-1]["norm"] == pytest.approx(intervention.norm)
    assert result.trajectory_matrix().shape[0] == 7


def test_training_is_reproducible(model, dataset):
    runs = []
    for _ in range(2):
        vec = SteeringVector.for_model(model, 1)
        train(model, vec, dataset, TrainConfig(lr=1e-3, max_steps=3, seed=7, **FAST))
        runs.append(vec.effective.detach())
    assert torch.equal(runs[0], runs[1])


def test_kl_regularised_training_and_resume(model, dataset, tmp_path):
    alt = TokenDataset.from_conversations(model.tokenizer, "kl:medical", limit=8)
    vec = SteeringVector.for_model(model, 1)
    config = TrainConfig(lr=1e-3, max_steps=4, kl_weight=5.0, kl_batch_size=2, **FAST)
    result = train(model, vec, dataset, config, kl_dataset=alt)
    assert all("kl" in rec for rec in result.losses) and result.losses[-1]["kl"] > 0
    result.save(tmp_path / "run")
    loaded = TrainingResult.load(tmp_path / "run")
    assert loaded.config == config and loaded.losses == result.losses
    torch.testing.assert_close(loaded.intervention.effective, vec.effective)
    continued = train(model, loaded.intervention, dataset, TrainConfig(lr=1e-3, max_steps=2, **FAST), resume_from=loaded)
    assert [r["step"] for r in continued.losses] == [1, 2, 3, 4, 5, 6]
    assert [s for s, _ in continued.trajectory] == [0, 2, 4, 6]
    assert "kl" not in continued.losses[-1]


def test_kl_weight_without_data_is_an_error(model, dataset):
    with pytest.raises(ValueError, match="needs a kl_dataset"):
        train(model, SteeringVector.for_model(model, 1), dataset, TrainConfig(kl_weight=1.0, **FAST))


def test_config_json_roundtrip():
    config = TrainConfig(lr=3e-4, kl_weight=6.6)
    assert TrainConfig.from_json(config.to_json()) == config
    with pytest.raises(ValueError, match="unknown TrainConfig fields"):
        TrainConfig.from_json('{"learning_rate": 1}')
    with pytest.raises(FileNotFoundError, match="not a saved training run"):
        TrainingResult.load("/nonexistent/run")


def test_fused_forwards_group_consecutive_items_within_the_token_budget() -> None:
    from emlens.training import _fuse

    def item(tokens: int) -> tuple[str, list[int], object]:
        ids = torch.ones((1, tokens), dtype=torch.long)
        return ("sft", [0], collate_like(ids))

    def collate_like(ids: torch.Tensor) -> object:
        from emlens.data import ChatBatch

        return ChatBatch(ids, torch.ones_like(ids), torch.ones_like(ids, dtype=torch.bool))

    sizes = [[int(b.attention_mask.sum()) for _, _, b in group] for group in _fuse([item(n) for n in (3, 4, 5, 9, 2, 1)], 8)]
    assert sizes == [[3, 4], [5], [9], [2, 1]]  # in order, never split, an item over the budget alone
    assert [len(g) for g in _fuse([item(n) for n in (3, 4, 5)], 10**6)] == [3]


def test_train_tokens_env_var(monkeypatch: pytest.MonkeyPatch) -> None:
    from emlens.training import TRAIN_TOKENS_PER_FORWARD, train_tokens_per_forward
    from emlens.validation import ConfigError

    monkeypatch.delenv("EMLENS_TRAIN_TOKENS", raising=False)
    assert train_tokens_per_forward() == TRAIN_TOKENS_PER_FORWARD
    monkeypatch.setenv("EMLENS_TRAIN_TOKENS", "512")
    assert train_tokens_per_forward() == 512
    for bad in ("0", "-3", "lots", "1.5"):
        monkeypatch.setenv("EMLENS_TRAIN_TOKENS", bad)
        with pytest.raises(ConfigError, match="EMLENS_TRAIN_TOKENS"):
            train_tokens_per_forward()


def test_a_bad_train_tokens_env_var_stops_train_before_any_work(model, dataset, monkeypatch: pytest.MonkeyPatch) -> None:
    from emlens.validation import ConfigError

    monkeypatch.setenv("EMLENS_TRAIN_TOKENS", "many")
    vec = SteeringVector.for_model(model, 1)
    with pytest.raises(ConfigError, match="EMLENS_TRAIN_TOKENS"):
        train(model, vec, dataset, TrainConfig(max_steps=1, progress=False))


def test_caches_built_by_another_model_are_refused(model, dataset):
    """Residuals and the KL term's base distribution of another model (the same tokenizer, other weights) would train
    this one on that model's numbers: train() refuses them."""
    from emlens.training import TrainingCaches
    from tests.conftest import tiny_model

    other = tiny_model("llama", seed=2)
    vector = SteeringVector(1, model.cfg.d_model)
    caches = TrainingCaches.build(other, vector, dataset, dataset, progress=False)
    config = TrainConfig(max_steps=1, kl_weight=1.0, **FAST)
    with pytest.raises(ValueError, match="built by another model"):
        train(model, vector, dataset, config, kl_dataset=dataset, caches=caches)
    train(other, vector, dataset, config, kl_dataset=dataset, caches=caches)  # the model that built them may use them


def test_a_model_is_freed_once_nothing_else_holds_it(dataset):
    """The runner emlens keeps per model (and a residual store's tie to it) does not keep the model alive."""
    import gc
    import weakref

    from emlens.runner import ResidualStore, runner_for
    from emlens.training import TrainingCaches
    from tests.conftest import tiny_model

    model = tiny_model("llama", seed=3)
    assert runner_for(model) is runner_for(model)
    store = ResidualStore()
    TrainingCaches.build(model, SteeringVector(1, model.cfg.d_model), dataset, progress=False, store=store)
    assert len(store) > 0
    gone = weakref.ref(model)
    del model
    gc.collect()
    assert gone() is None
    other = tiny_model("llama", seed=4)
    store.bind(other)  # the store's model is gone: it forgets that model's residuals before serving another's
    assert len(store) == 0


def test_a_run_does_not_resume_on_other_weights_or_another_dtype(dataset, tmp_path):
    """Checkpoints name the model by its weights, not only its name: a re-trained checkpoint at the same path, or the
    same one loaded in bfloat16, would continue a run computed on other numbers."""
    from emlens.checkpoints import RunCheckpointError
    from tests.conftest import tiny_model

    first, other = tiny_model("llama", seed=5), tiny_model("llama", seed=6)
    assert first.cfg.model_name == other.cfg.model_name
    config = TrainConfig(lr=1e-3, max_steps=2, **FAST)
    train(first, SteeringVector(1, first.cfg.d_model), dataset, config, run_dir=tmp_path / "run")
    train(first, SteeringVector(1, first.cfg.d_model), dataset, config, run_dir=tmp_path / "run", resume=True)  # the same: fine
    with pytest.raises(RunCheckpointError, match="its model differs"):
        train(other, SteeringVector(1, other.cfg.d_model), dataset, config, run_dir=tmp_path / "run", resume=True)
    with pytest.raises(RunCheckpointError, match="its model differs"):
        train(first.to(torch.bfloat16), SteeringVector(1, first.cfg.d_model), dataset, config, run_dir=tmp_path / "run", resume=True)
