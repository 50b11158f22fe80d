"""The judge-free preference metric on the tiny model: pairing, a hand-computed margin, CIs, the grid, plots and CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from emlens.data import read_conversations, write_conversations
from emlens.interventions import SteeringVector
from emlens.models import tiny_hf_model
from emlens.preference import (
    BASE,
    PairingWarning,
    bootstrap_ci,
    example_nlls,
    format_table,
    pair_conversations,
    paired_datasets,
    paired_margins,
    plot_preference,
    plot_preference_grid,
    preference_grid,
    preference_table,
    summarise,
)

LIMIT = 6


def test_builtin_sets_pair_by_id_on_the_held_out_split(model):
    from emlens.data import read_rows

    for domain in ("medical", "financial", "sports"):
        harmful, correct = read_conversations(f"{domain}_harmful"), read_conversations(f"{domain}_correct")
        pairs = pair_conversations(harmful, correct)
        assert len(pairs) == len(harmful) == len(correct)
        for h, c in pairs:
            assert [m for m in h if m["role"] != "assistant"] == [m for m in c if m["role"] != "assistant"]
            assert h[-1]["content"] != c[-1]["content"]
    pairs = paired_datasets(model.tokenizer, "medical", limit=LIMIT)
    assert len(pairs) == len(pairs.harmful) == len(pairs.correct) == LIMIT
    held = read_rows("medical_harmful:heldout")
    assert pairs.prompts[0] == held[0]["messages"][0]["content"] and pairs.prompts[-1] == held[-1]["messages"][0]["content"]  # evenly spaced
    assert len(set(pairs.groups)) == LIMIT  # one question per pair
    train = paired_datasets(model.tokenizer, "medical", split="train", limit=3)
    assert not set(train.prompts) & {r["messages"][0]["content"] for r in held}


def test_technical_prose_pairs_technical_with_plain(model):
    pairs = paired_datasets(model.tokenizer, "vehicles", limit=2)
    tech = read_conversations("vehicles_technical:heldout")
    assert len(pairs) == 2 and pairs.prompts[0] == tech[0][0]["content"]


def test_a_pair_whose_answer_is_cut_by_max_length_is_named_in_a_warning(model):
    """Per-token margins of a cut answer compare part of it with the whole other answer: say so, never silently."""
    import warnings as w

    with w.catch_warnings(record=True) as seen:
        w.simplefilter("always")
        paired_datasets(model.tokenizer, "vehicles", limit=4, max_length=4096)
    assert not [x for x in seen if issubclass(x.category, PairingWarning)]
    longest = max(len(e.input_ids) for e in paired_datasets(model.tokenizer, "vehicles", limit=4, max_length=4096).harmful.examples)
    with pytest.warns(PairingWarning, match=r"reaches max_length=.* cut short"):
        pairs = paired_datasets(model.tokenizer, "vehicles", limit=4, max_length=longest - 1)
    assert len(pairs) >= 1


def test_pairing_ignores_row_order_and_reports_orphans(tmp_path, model):
    def conv(q, a):
        return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]

    write_conversations(tmp_path / "h.jsonl", [conv("A?", "bad a"), conv("B?", "bad b"), conv("C?", "bad c"), conv("D?", "bad d")])
    write_conversations(tmp_path / "c.jsonl", [conv("C?", "good c"), conv("A?", "good a"), conv("B?", "good b")])
    with pytest.warns(PairingWarning, match="1 harmful and 0 correct"):
        pairs = paired_datasets(model.tokenizer, "toy", harmful_source=tmp_path / "h.jsonl", correct_source=tmp_path / "c.jsonl")
    assert pairs.prompts == ["A?", "B?", "C?"]
    tok = model.tokenizer
    for i, letter in enumerate("abc"):
        assert f"bad {letter}" in tok.decode(pairs.harmful.examples[i].input_ids)
        assert f"good {letter}" in tok.decode(pairs.correct.examples[i].input_ids)


def _hand_nll(hf, ids: list[int], mask: list[bool]) -> float:
    """Plain torch: mean −log p(token t+1 | ≤ t) over assistant tokens t+1, one unpadded example."""
    with torch.no_grad():
        logits = hf(input_ids=torch.tensor([ids])).logits[0]
    logp = torch.log_softmax(logits.double(), -1)
    terms = [-logp[t, ids[t + 1]].item() for t in range(len(ids) - 1) if mask[t + 1]]
    return sum(terms) / len(terms)


def test_margin_matches_a_hand_computation(model):
    hf, _ = tiny_hf_model("llama", seed=0)  # the same weights as the session's tiny bridge
    pairs = paired_datasets(model.tokenizer, "financial", limit=LIMIT)
    margins = paired_margins(model, pairs, None, batch_size=4)  # batches of 4 pad the rows differently
    expected = [
        _hand_nll(hf, c.input_ids, c.loss_mask) - _hand_nll(hf, h.input_ids, h.loss_mask)
        for h, c in zip(pairs.harmful.examples, pairs.correct.examples)
    ]
    torch.testing.assert_close(margins.double(), torch.tensor(expected, dtype=torch.float64), atol=2e-4, rtol=0)
    nlls = example_nlls(model, pairs.harmful, None, batch_size=LIMIT)
    assert nlls.shape == (LIMIT,) and torch.isfinite(nlls).all()


def test_bootstrap_ci():
    values = np.random.default_rng(1).normal(0.3, 1.0, size=50)
    lo, hi = bootstrap_ci(values, n_boot=1000, seed=0)
    assert lo < values.mean() < hi and hi - lo < 1.0
    assert bootstrap_ci(values, n_boot=1000, seed=0) == (lo, hi)  # seeded
    assert bootstrap_ci([2.0, 2.0, 2.0]) == (2.0, 2.0)
    s = summarise("medical", torch.tensor([0.1, 0.2, 0.6]), n_boot=500)
    assert s.n == 3 and s.mean == pytest.approx(0.3) and len(s.ci) == 2 and s.ci[0] <= s.mean <= s.ci[1]
    # clustered rows: resampling whole groups gives a wider interval than pretending rows are independent
    groups = np.repeat(np.arange(10), 5)
    clustered = np.repeat(np.random.default_rng(2).normal(0, 1, 10), 5) + np.random.default_rng(3).normal(0, 0.05, 50)
    lo_g, hi_g = bootstrap_ci(clustered, n_boot=2000, groups=groups)
    lo_r, hi_r = bootstrap_ci(clustered, n_boot=2000)
    assert lo_g <= clustered.mean() <= hi_g and hi_g - lo_g > 1.5 * (hi_r - lo_r)
    g = summarise("medical", torch.tensor(clustered), n_boot=200, groups=list(groups))
    assert g.n == 50 and g.n_groups == 10
    with pytest.raises(ValueError, match="group labels"):
        bootstrap_ci([1.0, 2.0], groups=[0])


def test_zero_vector_gives_base_margins_and_a_steer_moves_them(model, tmp_path):
    zero = SteeringVector.from_vector(torch.zeros(model.cfg.d_model), layer=1)
    push = SteeringVector.from_vector(3.0 * torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(0)), layer=1)
    table = preference_table(model, {BASE: None, "zero": zero, "push": push}, ["medical", "sports"], limit=LIMIT,
                             batch_size=LIMIT, n_boot=200, progress=False)
    for d in ("medical", "sports"):
        torch.testing.assert_close(table["zero"][d].margins, table[BASE][d].margins)
        assert table["zero"][d].ci == table[BASE][d].ci and table[BASE][d].n == LIMIT
        assert not torch.allclose(table["push"][d].margins, table[BASE][d].margins)
    text = format_table(table)
    assert text.splitlines()[0] == "| domain | base | zero | push |" and "| medical |" in text
    png = plot_preference(table, tmp_path / "bars.png")
    assert png.stat().st_size > 1000


def test_grid(model, tmp_path):
    vec = SteeringVector.from_vector(torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(1)), layer=2)
    grid = preference_grid(model, {"medical": vec, "sports": vec}, ["medical", "sports"], limit=3, batch_size=3,
                           n_boot=100, progress=False)
    assert list(grid) == [BASE, "medical", "sports"] and all(list(row) == ["medical", "sports"] for row in grid.values())
    torch.testing.assert_close(grid["medical"]["sports"].margins, grid["sports"]["sports"].margins)
    assert plot_preference_grid(grid, tmp_path / "grid.png").stat().st_size > 1000


def test_cli_handler(model, tmp_path, monkeypatch):
    import emlens.models
    from emlens.cli import main

    monkeypatch.setattr(emlens.models, "load_model", lambda *a, **k: model)
    vec_path = SteeringVector.from_vector(torch.ones(model.cfg.d_model), layer=1).save(tmp_path / "steer.safetensors")
    out = tmp_path / "fig" / "preference.png"
    code = main(["preference", f"general={vec_path}", "--domains", "medical", "--limit", "3", "--bootstrap", "100", "--device", "cpu", "--out", str(out)])
    assert code == 0
    info = json.loads(out.with_suffix(".json").read_text())
    assert set(info["results"]) == {"base", "general"} and info["results"]["general"]["medical"]["n"] == 3
    assert info["measure"] == "preference" and info["settings"]["split"] == "heldout"
    assert out.stat().st_size > 1000
