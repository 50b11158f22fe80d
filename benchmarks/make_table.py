"""Render benchmark JSON files (from bench_gpu.py) as the markdown tables of RESULTS.md."""

import json
import sys


def main(paths: list[str]) -> None:
    train_rows, sweep_rows, warmups, devices = [], [], {}, set()
    for path in paths:
        data = json.load(open(path))
        devices.add(data["device"])
        for row in data["rows"]:
            if "sweep" in row:
                sweep_rows.append(row)
            elif "method" in row:
                train_rows.append(row)
            elif "emlens_warmup_and_compile_s" in row:
                warmups[row["model"]] = row["emlens_warmup_and_compile_s"]
    print(f"Device: {', '.join(sorted(devices))}\n")
    print("| model (layer) | method | KL | tokens/s (one run, caches built in it) | vs HF+PEFT | tokens/s (caches reused) | vs HF+PEFT | cache build (s) | peak GiB | MFU |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    base = {(r["model"], r["kl"]): r["tokens_per_s"] for r in train_rows if r["method"] == "HF+PEFT rank-1 LoRA"}
    for r in train_rows:
        ratio = r["tokens_per_s"] / base[(r["model"], r["kl"])]
        reused = r.get("tokens_per_s_reused_cache")
        reused_cols = f"{reused:,} | {reused / base[(r['model'], r['kl'])]:.2f}" if reused else "– | –"
        build = r.get("cache_build_s", "–")
        print(f"| {r['model']} ({r['layer']}) | {r['method']} | {'yes' if r['kl'] else 'no'} | {r['tokens_per_s']:,} | "
              f"{ratio:.2f} | {reused_cols} | {build} | {r['peak_GiB']} | {100 * r['mfu']:.1f}% |")
    print("\n| model | sweep | full re-run per point (s) | emlens (s) | speedup | max abs loss diff |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for r in sweep_rows:
        print(f"| {r['model']} | {r['sweep']} | {r['reference_s']} | {r['emlens_s']} | {r['speedup']:.2f}× | {r['max_abs_loss_diff']} |")
    if warmups:
        print("\nemlens warm-up before timing (first calls; includes torch.compile where it is on): "
              + ", ".join(f"{m} {s} s" for m, s in warmups.items()))


if __name__ == "__main__":
    main(sys.argv[1:])
