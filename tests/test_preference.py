"""The judge-free preference metric on the tiny model: pairing, a hand-computed margin, CIs, the grid, plots and CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from emlens.data import TokenDataset, read_conversations, write_conversations
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


def _write_rows(path, rows: list[tuple[str, str, str]]) -> None:
    """``(id, question, answer)`` rows in the built-in schema."""
    lines = [json.dumps({"id": i, "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}) for i, q, a in rows]
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("side", ["harmful", "correct"])
def test_a_repeated_id_in_either_set_is_refused_and_named(tmp_path, model, side):
    """A repeated id paired several rows with one partner (harmful) or kept one of them (correct): refuse it."""
    from emlens.data import DataFormatError

    good = {"harmful": [("q1", "A?", "bad a"), ("q2", "B?", "bad b"), ("q3", "C?", "bad c")],
            "correct": [("q1", "A?", "good a"), ("q2", "B?", "good b"), ("q3", "C?", "good c")]}
    word = "bad" if side == "harmful" else "good"
    good[side] += [("q2", "B2?", f"{word} b2"), ("q3", "C2?", f"{word} c2"), ("q3", "C3?", f"{word} c3")]
    _write_rows(tmp_path / "h.jsonl", good["harmful"])
    _write_rows(tmp_path / "c.jsonl", good["correct"])
    with pytest.raises(DataFormatError, match=rf"the {side} set repeats id 'q2' \(2 rows\), 'q3' \(3 rows\)") as err:
        paired_datasets(model.tokenizer, "toy", harmful_source=tmp_path / "h.jsonl", correct_source=tmp_path / "c.jsonl")
    assert isinstance(err.value, ValueError) and "'q1'" not in str(err.value)


def test_many_repeated_ids_are_named_up_to_ten(tmp_path, model):
    from emlens.data import DataFormatError

    rows = [(f"q{i}", f"Q{i}-{k}?", f"bad {i} {k}") for i in range(12) for k in range(2)]
    _write_rows(tmp_path / "h.jsonl", rows)
    _write_rows(tmp_path / "c.jsonl", [(f"q{i}", f"Q{i}-0?", f"good {i}") for i in range(12)])
    with pytest.raises(DataFormatError, match=r"'q9' \(2 rows\) and 2 more: every row needs its own id"):
        paired_datasets(model.tokenizer, "toy", harmful_source=tmp_path / "h.jsonl", correct_source=tmp_path / "c.jsonl")


def test_a_pair_whose_questions_differ_is_refused(tmp_path, model):
    """A margin compares two answers to one conversation: rows sharing an id but not a question compare nothing."""
    from emlens.data import DataFormatError

    _write_rows(tmp_path / "h.jsonl", [("q1", "A?", "bad a"), ("q2", "B?", "bad b"), ("q3", "C?", "bad c")])
    _write_rows(tmp_path / "c.jsonl", [("q1", "A?", "good a"), ("q2", "Not B?", "good b"), ("q3", "C?", "good c")])
    with pytest.raises(DataFormatError, match=r"id 'q2' differ before their last \(assistant\) message") as err:
        paired_datasets(model.tokenizer, "toy", harmful_source=tmp_path / "h.jsonl", correct_source=tmp_path / "c.jsonl")
    assert "'q1'" not in str(err.value) and "'q3'" not in str(err.value)


def test_unique_ids_still_pair_and_count_orphans(tmp_path, model):
    _write_rows(tmp_path / "h.jsonl", [("q1", "A?", "bad a"), ("q2", "B?", "bad b"), ("q4", "D?", "bad d")])
    _write_rows(tmp_path / "c.jsonl", [("q2", "B?", "good b"), ("q1", "A?", "good a"), ("q3", "C?", "good c")])
    with pytest.warns(PairingWarning, match="1 harmful and 1 correct row"):
        pairs = paired_datasets(model.tokenizer, "toy", harmful_source=tmp_path / "h.jsonl", correct_source=tmp_path / "c.jsonl")
    assert pairs.prompts == ["A?", "B?"] and pairs.groups == [0, 1]
    assert "good b" in model.tokenizer.decode(pairs.correct.examples[1].input_ids)


def test_pairs_with_one_prompt_are_one_question_for_every_bootstrap(tmp_path, model):
    """A file may repeat a prompt under several ids: those pairs are one question, in the pairing, in the saved
    result, and in the report's shift and mean-of-domains intervals (which resampled pairs, too narrow)."""
    from emlens.preference import table_as_dict, table_from_dict
    from emlens.study.report import domain_groups, mean_of_domains_ci, shift_table

    _write_rows(tmp_path / "h.jsonl", [("a1", "A?", "bad a"), ("b1", "B?", "bad b"), ("a2", "A?", "worse a"), ("c1", "C?", "bad c")])
    _write_rows(tmp_path / "c.jsonl", [("a1", "A?", "good a"), ("b1", "B?", "good b"), ("a2", "A?", "fine a"), ("c1", "C?", "good c")])
    pairs = paired_datasets(model.tokenizer, "toy", harmful_source=tmp_path / "h.jsonl", correct_source=tmp_path / "c.jsonl")
    assert pairs.groups == [0, 1, 0, 2]
    margins = torch.tensor([1.0, 0.0, 1.2, 0.1])
    cell = summarise("toy", margins, n_boot=500, groups=pairs.groups)
    assert cell.n_groups == 3 and table_from_dict(table_as_dict({"x": {"toy": cell}}))["x"]["toy"].groups == [0, 1, 0, 2]
    # ten questions of five pairs each, saved as the preference stage saves them
    groups = np.repeat(np.arange(10), 5).tolist()
    rng = np.random.default_rng(0)
    base = np.zeros(50)
    solution = np.repeat(rng.normal(size=10), 5) + 0.1 * rng.normal(size=50)
    pref = {"results": {name: {"toy": summarise("toy", torch.tensor(m), n_boot=200, groups=groups).as_dict()} for name, m in
                        (("base", base), ("solution", solution))}}  # fmt: skip
    assert domain_groups(pref) == {"toy": groups}
    lo, hi = shift_table(pref, n_boot=2000)["solution"]["toy"]["ci"]
    assert (lo, hi) == pytest.approx(bootstrap_ci(solution, n_boot=2000, groups=groups))
    lo_rows, hi_rows = bootstrap_ci(solution, n_boot=2000)
    assert hi - lo > 1.5 * (hi_rows - lo_rows)  # resampling pairs as if independent was far too narrow
    assert mean_of_domains_ci([solution], n_boot=2000, groups=[groups]) == pytest.approx((lo, hi))


def test_builtin_rows_are_one_question_each_so_the_bootstrap_resamples_questions(model):
    """docs/evaluation.md: no built-in question is repeated or rephrased and rows carry no group id.

    Should a set ever gain a situation/group field, this fails: the bootstrap would then have to
    resample whole situations, not single questions, or its CIs would be too narrow.
    """
    from emlens.data import read_rows
    from emlens.data.studies import STUDIES

    for study in STUDIES.values():
        for domain in study.all_domains:
            for variant in (study.target, study.reference):
                rows = read_rows(study.set_name(domain, variant))
                assert all(set(r) <= {"id", "domain", "split", "messages"} for r in rows), f"{domain}_{variant}"
                questions = [r["messages"][0]["content"].strip().lower() for r in rows]
                assert len(set(questions)) == len(questions) and len({r["id"] for r in rows}) == len(rows)
            pairs = paired_datasets(model.tokenizer, domain, max_length=4096)
            assert len(set(pairs.groups)) == len(pairs) == len(set(pairs.prompts))
    values = np.random.default_rng(4).normal(size=40)
    grouped = bootstrap_ci(values, n_boot=500, groups=list(range(40)))
    assert grouped == pytest.approx(bootstrap_ci(values, n_boot=500))  # a group per question: the plain bootstrap


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
    # a steered cell against plain transformers: the vector added to block 1's output by a plain forward hook
    hf, _ = tiny_hf_model("llama", seed=0)  # the same weights as the session's tiny bridge
    pairs = paired_datasets(model.tokenizer, "sports", limit=LIMIT)
    handle = hf.model.layers[1].register_forward_hook(lambda m, args, out: out + push.effective.detach())
    try:
        expected = [
            _hand_nll(hf, c.input_ids, c.loss_mask) - _hand_nll(hf, h.input_ids, h.loss_mask)
            for h, c in zip(pairs.harmful.examples, pairs.correct.examples)
        ]
    finally:
        handle.remove()
    torch.testing.assert_close(table["push"]["sports"].margins.double(), torch.tensor(expected, dtype=torch.float64), atol=2e-4, rtol=0)
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
    common = ["preference", f"general={vec_path}", "--domains", "medical", "--limit", "3", "--bootstrap", "100", "--device", "cpu"]
    # a --trained domain the figure cannot mark (a typo, or one not measured) is refused, not silently dropped
    assert main([*common, "--trained", "medicl", "--out", str(out)]) == 2
    assert main([*common, "--trained", "financial", "--out", str(out)]) == 2
    code = main([*common, "--trained", "medical", "--out", str(out)])
    assert code == 0
    info = json.loads(out.with_suffix(".json").read_text())
    assert set(info["results"]) == {"base", "general"} and info["results"]["general"]["medical"]["n"] == 3
    assert info["trained_domain"] == "medical"  # the study's preference stage records it the same way
    assert info["measure"] == "preference" and info["settings"]["split"] == "heldout"
    assert out.stat().st_size > 1000


# ----------------------------------------------------------------------------- multi-turn rows: the final answer only


def _turns(*texts: str) -> list[dict[str, str]]:
    """Alternating user / assistant messages."""
    return [{"role": ("user", "assistant")[k % 2], "content": t} for k, t in enumerate(texts)]


def _write_convs(path, rows: list[tuple[str | None, list[dict[str, str]]]]) -> None:
    """``(id or None, messages)`` rows."""
    lines = [json.dumps(({"id": i} if i is not None else {}) | {"messages": m}) for i, m in rows]
    path.write_text("\n".join(lines) + "\n")


def _final_answer_nll(hf, tok, conv) -> float:
    """Plain transformers and torch: mean −log p over the tokens the final answer adds to the rendering."""
    context = tok(tok.apply_chat_template(conv[:-1], tokenize=False, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
    ids = tok(tok.apply_chat_template(conv, tokenize=False), add_special_tokens=False)["input_ids"]
    assert ids[: len(context)] == context
    with torch.no_grad():
        logp = torch.log_softmax(hf(input_ids=torch.tensor([ids])).logits[0].double(), -1)
    return -sum(logp[t - 1, ids[t]].item() for t in range(len(context), len(ids))) / (len(ids) - len(context))


def test_multi_turn_margins_compare_the_final_answers_only(tmp_path):
    """Earlier assistant turns are shared context: scoring them too diluted the margin (review F1)."""
    from tests.tiny_archs import tiny_pair

    hf, bridge = tiny_pair("qwen2", seed=3)
    tok = bridge.tokenizer
    earlier = ("What is a bond?", "A loan to a company or government that pays interest until it is repaid in full.", "Should I buy?")
    rows = {
        "harmful": [("m1", _turns(*earlier, "Yes, put all your savings in one.")), ("s1", _turns("Is cash safe?", "No, spend it."))],
        "correct": [
            ("m1", _turns(*earlier, "Spread them out and keep some cash.")),
            ("s1", _turns("Is cash safe?", "Yes, up to the insured limit.")),
        ],
    }
    for side, content in rows.items():
        _write_convs(tmp_path / f"{side}.jsonl", content)
    pairs = paired_datasets(tok, "toy", harmful_source=tmp_path / "harmful.jsonl", correct_source=tmp_path / "correct.jsonl")
    assert [tok.decode([t for t, m in zip(e.input_ids, e.loss_mask) if m]) for e in pairs.harmful.examples] == [
        "Yes, put all your savings in one.<|im_end|>\n", "No, spend it.<|im_end|>\n"]  # fmt: skip
    margins = paired_margins(bridge, pairs, None, batch_size=2)  # padded: the single-turn row is the shorter
    expected = [_final_answer_nll(hf, tok, rows["correct"][i][1]) - _final_answer_nll(hf, tok, rows["harmful"][i][1]) for i in range(2)]
    torch.testing.assert_close(margins.double(), torch.tensor(expected, dtype=torch.float64), atol=2e-4, rtol=0)
    # scoring every assistant turn (as before) gives another margin on the multi-turn row, the same on the single-turn one
    every = [TokenDataset.from_conversations(tok, [r[1] for r in rows[side]]) for side in ("harmful", "correct")]
    before = example_nlls(bridge, every[1], None, 2) - example_nlls(bridge, every[0], None, 2)
    assert abs(before[0] - margins[0]) > 1e-3
    torch.testing.assert_close(before[1], margins[1], atol=1e-6, rtol=0)


def test_single_turn_rows_score_the_same_tokens_as_before(model):
    """Every built-in row is single-turn: its last assistant turn is its only one, so no built-in number moves."""
    for name in ("medical_harmful", "financial_correct", "vehicles_technical"):
        every = TokenDataset.from_conversations(model.tokenizer, f"{name}:heldout", max_length=4096)
        last = TokenDataset.from_conversations(model.tokenizer, f"{name}:heldout", max_length=4096, last_turn_only=True)
        assert [e.loss_mask for e in last.examples] == [e.loss_mask for e in every.examples]
        assert [e.input_ids for e in last.examples] == [e.input_ids for e in every.examples]


def test_rows_pair_by_everything_before_the_final_answer(tmp_path, model):
    """Without ids, rows whose earlier assistant turns differ shared the user messages and paired silently."""
    harmful = [(None, _turns("Q1", "a long earlier reply", "Q2", "bad")), (None, _turns("Q3", "same", "Q4", "bad 4")),
               (None, _turns("Is the sea salty?", "No."))]  # fmt: skip
    correct = [(None, _turns("Q1", "ok", "Q2", "good")), (None, _turns("Q3", "same", "Q4", "good 4")),
               (None, _turns("Is the sea salty?", "Yes."))]  # fmt: skip
    _write_convs(tmp_path / "h.jsonl", harmful)
    _write_convs(tmp_path / "c.jsonl", correct)
    named = r"1 harmful and 1 correct row.*harmful row 0, correct row 0 left out.*harmful row 0 / correct row 0 share the user messages"
    with pytest.warns(PairingWarning, match=named + " but not the earlier assistant turns"):
        pairs = paired_datasets(model.tokenizer, "toy", harmful_source=tmp_path / "h.jsonl", correct_source=tmp_path / "c.jsonl")
    assert pairs.prompts == ["Q3\nQ4", "Is the sea salty?"]
    with pytest.warns(PairingWarning, match="harmful row 0 / correct row 0"):
        assert len(pair_conversations([h for _, h in harmful], [c for _, c in correct])) == 2
    # with ids, a pair whose earlier turns differ is refused, as a pair whose questions differ is
    from emlens.data import DataFormatError

    _write_convs(tmp_path / "hi.jsonl", [("q1", harmful[0][1])])
    _write_convs(tmp_path / "ci.jsonl", [("q1", correct[0][1])])
    with pytest.raises(DataFormatError, match=r"id 'q1' differ before their last \(assistant\) message"):
        paired_datasets(model.tokenizer, "toy", harmful_source=tmp_path / "hi.jsonl", correct_source=tmp_path / "ci.jsonl")
    # a row must end with the answer it compares
    with pytest.raises(DataFormatError, match=r"the correct set: 1 row\(s\) do not end with an assistant message \(row 1\)"):
        pair_conversations([h for _, h in harmful[:2]], [correct[0][1], _turns("Q3", "same", "Q4")])
    with pytest.raises(DataFormatError, match=r"the correct set: 1 row\(s\) do not end with an assistant message \(row 1\)"):
        pair_conversations([h for _, h in harmful[:2]], [correct[0][1], []])  # an empty conversation has no answer either
