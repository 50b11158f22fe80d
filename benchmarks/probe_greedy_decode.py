"""Where bf16 greedy decoding of the slot decoder departs from plain transformers' ``generate`` (random-init 14B).

Four left-padded chat prompts × ``--new`` greedy tokens. References: plain ``generate`` with PyTorch's default SDPA
kernels, and with emlens' decoding kernels (all but cuDNN's). Slot decoder variants: as shipped (CUDA graphs, cache
attended in blocks of 64 slots), without graphs, and without graphs attending exactly the written slots. For each:
the first step where each row's token differs from each reference, and the largest logit difference at the first
step (the prefill) and the second.

    python benchmarks/probe_greedy_decode.py --tokenizer .tok_smollm2 --out $OUT/probe_greedy.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_gpu import build_model  # noqa: E402
from bench_sampling import chat_prompts, left_padded  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="qwen2.5-14b")
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--n-layers", type=int, default=None)
    args = p.parse_args()
    from torch.nn.attention import sdpa_kernel
    from transformers import AutoTokenizer

    import emlens.runner.decoding as decoding
    from emlens.evaluation import GENERAL_QUESTIONS

    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    hf = build_model(args.model, args.device, dtype, args.n_layers)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    prompts = sorted(chat_prompts(tok, list(GENERAL_QUESTIONS[:4]), 1), key=len)
    ids, mask = left_padded(prompts, pad, args.device)

    def hf_greedy(backends: Any | None) -> tuple[torch.Tensor, torch.Tensor]:
        kwargs = dict(attention_mask=mask, max_new_tokens=args.new, do_sample=False, pad_token_id=pad, eos_token_id=None,
                      output_logits=True, return_dict_in_generate=True)
        with torch.no_grad():
            if backends is None:
                out = hf.generate(ids, **kwargs)
            else:
                with sdpa_kernel(backends):
                    out = hf.generate(ids, **kwargs)
        return out.sequences[:, ids.shape[1]:], torch.stack(out.logits)

    def slot(graphs: bool, block: int) -> tuple[torch.Tensor, torch.Tensor]:
        saved, decoding.SLOT_BLOCK = decoding.SLOT_BLOCK, block
        try:
            tokens, logits = decoding.decode(hf, ids, mask, args.new, 0.0, 1.0, [], pad, keep_logits=True, graphs=graphs)
        finally:
            decoding.SLOT_BLOCK = saved
        assert logits is not None
        return tokens, logits

    refs = {"generate, default SDPA kernels": hf_greedy(None), "generate, emlens' SDPA kernels": hf_greedy(decoding.DECODE_SDPA_BACKENDS)}
    variants = {"slot decoder as shipped (graphs, blocks of 64)": slot(True, decoding.SLOT_BLOCK),
                "slot decoder, no graphs, blocks of 64": slot(False, decoding.SLOT_BLOCK),
                "slot decoder, no graphs, exact lengths": slot(False, 1)}
    record: dict[str, Any] = {"command": " ".join(sys.argv), "model": args.model, "prompt_lengths": [len(p) for p in prompts],
                              "new": args.new, "results": {}}
    everything = {**refs, **variants}
    for name, (tokens, logits) in everything.items():
        row: dict[str, Any] = {}
        for ref_name, (ref_tokens, ref_logits) in refs.items():
            if ref_name == name:
                continue
            same = tokens == ref_tokens
            first = [int((~r).nonzero()[0, 0]) if bool((~r).any()) else None for r in same]
            row[ref_name] = {"first_difference_at": first, "max_logit_diff_step0": float((logits[0] - ref_logits[0]).abs().max()),
                             "max_logit_diff_step1": float((logits[1] - ref_logits[1]).abs().max())}
        record["results"][name] = row
        print(json.dumps({name: row}), flush=True)
    Path(args.out).write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
