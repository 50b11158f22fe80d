"""Render a ``benchmarks/study_gpu.py`` JSON as Markdown: the stage-by-stage table, totals and the 10-minute target.

python benchmarks/make_study_table.py benchmarks/raw/h200_study_14b.json
"""

from __future__ import annotations

import json
import sys
from typing import Any


def seconds(x: float | None) -> str:
    return "–" if x is None else f"{x:,.1f}"


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
