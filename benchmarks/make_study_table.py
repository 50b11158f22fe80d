"""Render a ``benchmarks/study_gpu.py`` JSON as Markdown: the stage-by-stage table, totals and the 10-minute target.

python benchmarks/make_study_table.py benchmarks/raw/h200_study_14b.json
"""

from __future__ import annotations

import json
import sys
from typing import Any


def seconds(x: float | None) -> str:
    return "–" if x is None else f"{x:,.1f}"


def vector_stages_at_peft_rate(data: dict[str, Any]) -> tuple[float, float] | None:
    """The reference total with its vector-training stages at the PEFT LoRA's timed rate (same KL setting), and the speed-up.

    The reference's first timed sample in a process (its HF-hook vector, SFT) carries first-call costs: it runs about
    twice as slow as the PEFT sample at the same shapes, while the training benchmark measures the two methods equal.
    """
    train = data.get("reference", {}).get("train", {})
    rates = {k: train.get(k, {}).get("s_per_step") for k in ("vector/sft", "vector/kl", "adapter/sft", "adapter/kl")}
    if None in rates.values():
        return None
    total = 0.0
    for row in data.get("rows", []):
        ref = row.get("reference_s") or 0.0
        name = row["stage"]
        if name.startswith(("train/vector/", "drift/vector")):
            kl = name.startswith("train/vector/kl=") and name != "train/vector/kl=0"
            # a vector KL stage is extrapolated from the SFT rate plus the KL sample's extra: scale the whole by the PEFT ratio
            ref *= rates["adapter/kl" if kl else "adapter/sft"] / max(rates["vector/kl" if kl else "vector/sft"], rates["vector/sft"])
        total += ref
    emlens = data.get("totals", {}).get("emlens_s")
    return total, (total / emlens if emlens else float("nan"))


def table(data: dict[str, Any]) -> str:
    lines = [
        f"Model: {data.get('model')} on {data.get('device')}; calls: {len(data.get('calls', []))}.",
        "",
        "| stage | emlens (s) | | reference (s) | reference extrapolated from | notes |",
        "| --- | ---: | --- | ---: | --- | --- |",
    ]
    for row in data.get("rows", []):
        mark = "measured" if row["emlens_measured"] else "estimated"
        notes = row.get("notes", "").replace("|", "/")
        lines.append(
            f"| {row['stage']} | {seconds(row['emlens_s'])} | {mark} | {seconds(row['reference_s'])} | "
            f"{row['reference_extrapolated_from']} | {notes} |"
        )
    t = data.get("totals", {})
    lines.append(
        f"| **total** | **{seconds(t.get('emlens_s'))}** | {t.get('emlens_rows_measured')}/{t.get('rows')} rows measured "
        f"({seconds(t.get('emlens_measured_s'))} s) | **{seconds(t.get('reference_s'))}** | | "
        f"speedup {t.get('speedup')}× |"
    )
    target = data.get("target", {})
    lines += [
        "",
        f"Target (issue 18): the whole study in at most {target.get('emlens_total_at_most_s')} s: "
        f"{seconds(target.get('emlens_total_s'))} s, **{'met' if target.get('met') else 'not met'}**"
        + ("" if target.get("all_measured") else " (part of it estimated, see the rows)")
        + ".",
        *(
            [
                "",
                f"With the reference's vector-training stages at its PEFT LoRA rate (its first timed sample carries first-call "
                f"costs): reference {seconds(peft[0])} s, speed-up {peft[1]:.2f}×.",
            ]
            if (peft := vector_stages_at_peft_rate(data)) is not None
            else []
        ),
        *(
            [
                "",
                f"The reference's timed samples come from an earlier measurement ({src['file']}, on {src.get('device')}: "
                + ", ".join(f"call {c['call']} of {c['started_at']}" for c in src.get("calls", []))
                + "), not timed again in this one.",
            ]
            if (src := data.get("reference_source"))
            else []
        ),
        "",
        "| call | only | wall (s) | model build (s) | reference (s) | warm-up (s) | emlens (s) | stages run | sampling run | stopped by budget | peak GiB |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- | ---: |",
    ]
    for c in data.get("calls", []):
        lines.append(
            f"| {c['call']} | {c['only']} | {seconds(c.get('wall_s'))} | {seconds(c.get('model_build_s'))} | {seconds(c.get('reference_s'))} | "
            f"{seconds(c.get('warmup_s'))} | {seconds(c.get('emlens_wall_s'))} | {len(c.get('stages_run', []))} | "
            f"{', '.join(c.get('sampling_run', [])) or '–'} | {c.get('stopped_by_budget') or '–'} | {c.get('peak_GiB') or '–'} |"
        )
    lines += ["", "Commands:", ""] + [f"    {c['command']}" for c in data.get("calls", [])]
    if data.get("calls"):
        c = data["calls"][-1]
        lines += ["", f"Versions: {json.dumps(c.get('versions'))}; code: {json.dumps(c.get('code'))}."]
    return "\n".join(lines)


def main() -> None:
    for path in sys.argv[1:]:
        with open(path) as fh:
            print(table(json.load(fh)))
            print()


if __name__ == "__main__":
    main()
