"""Merge a later ``study_gpu.py`` call that re-measured some stages into an earlier record of the same study.

A call that resumes from a reduced state (``--state-in``) writes a record holding the state's calls and its own.
When the state was taken before other calls of the record (a sampling re-run, say), this puts the later call's
re-measured stages and sampling runs into the full record as one more call and recomputes the rows and totals
with ``study_gpu.summarise``:

    python benchmarks/merge_study_record.py benchmarks/raw/h200_study_14b_mixing.json LATER.json --out MERGED.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import study_gpu  # noqa: E402


def merge(base: dict[str, Any], later: dict[str, Any]) -> dict[str, Any]:
    """``base`` with the last call of ``later`` appended (renumbered) and the stages and sampling runs it ran taken from it."""
    for key in ("model", "device", "data"):
        if base.get(key) != later.get(key):
            raise SystemExit(f"the two records differ in {key!r}: not the same study")
    call = dict(later["calls"][-1])
    number = max(c["call"] for c in base["calls"]) + 1
    call["call"] = number
    merged = json.loads(json.dumps(base))
    merged["calls"].append(call)
    for name in call.get("stages_run", []):
        merged["stages"][name] = {**later["stages"][name], "call": number}
    for label in call.get("sampling_run", []):
        merged["sampling"][label] = {**later["sampling"][label], "call": number}
    if later.get("report", {}).get("call") == later["calls"][-1]["call"]:  # the later call rewrote the report
        merged["report"] = {**later["report"], "call": number}
    args = study_gpu.parse_args([])
    for key, value in call["args"].items():
        setattr(args, key, value)
    study_gpu.summarise(merged, args, merged["data"])
    return merged


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("base")
    p.add_argument("later")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    merged = merge(json.loads(Path(a.base).read_text()), json.loads(Path(a.later).read_text()))
    Path(a.out).write_text(json.dumps(merged, indent=2, default=str))
    t = merged["totals"]
    print(json.dumps({"emlens_s": t["emlens_s"], "measured": t["emlens_rows_measured"], "rows": t["rows"]}))


if __name__ == "__main__":
    main()
