"""Render benchmark JSON files (from bench_gpu.py) as the markdown tables of RESULTS.md."""

import json
import sys


def main(paths: list[str]) -> None:
    train_rows, sweep_rows, devices = [], [], set()
    for path in paths:
        data = json.load(open(path))
        devices.add(data["device"])
        for row in data["rows"]:
            (sweep_rows if "sweep" in row else train_rows).append(row)
    print(f"Device: {', '.join(sorted(devices))}\n")
    print("| model (layer) | method | KL | tokens/s | emlens / HF+PEFT | peak GiB | MFU |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: |")
    base = {(r["model"], r["kl"]): r["tokens_per_s"] for r in train_rows if r["method"] == "HF+PEFT rank-1 LoRA"}
    for r in train_rows:
        ratio = r["tokens_per_s"] / base[(r["model"], r["kl"])]
        print(f"| {r['model']} ({r['layer']}) | {r['method']} | {'yes' if r['kl'] else 'no'} | {r['tokens_per_s']:,} | "
              f"{ratio:.2f} | {r['peak_GiB']} | {100 * r['mfu']:.1f}% |")
    print("\n| model | sweep | full re-run per point (s) | emlens cached prefix (s) | speedup | max abs loss diff |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for r in sweep_rows:
        print(f"| {r['model']} | {r['sweep']} | {r['reference_s']} | {r['emlens_s']} | {r['speedup']:.2f}× | {r['max_abs_loss_diff']} |")


if __name__ == "__main__":
    main(sys.argv[1:])
