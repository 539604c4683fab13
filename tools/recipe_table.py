#!/usr/bin/env python3
"""Chapter 7's storage table from the runs of scripts/gpu_recipe.sh.

Usage: tools/recipe_table.py RUNS_DIR [--json OUT.json] [--png OUT.png]

Reads RUNS_DIR/*/summary.json and RUNS_DIR/*/log.jsonl (written by `qlora finetune`),
prints a Markdown table (storage, optimizer, validation loss before/after, distance
from the Hugging Face reference, frozen bytes, tokens/s, peak GPU memory), and
optionally writes all of it as one JSON file (docs/bench/finetune-recipe-*.json) and
a plot of the validation-loss curves.

The reference values are the issue's: transformers + PEFT + bitsandbytes on an H100
with the same recipe (BF16 LoRA 4.996, NF4+DQ 4.992, NF4 4.990, FP4+DQ 4.986).
"""
import argparse
import json
import pathlib
import sys

HF_REFERENCE = {"bf16": 4.996, "nf4-dq": 4.992, "nf4": 4.990, "fp4-dq": 4.986}
TOLERANCE = 0.05  # nats/token: the bar for "matches the reference stack"


def load_runs(root):
    runs = []
    for summary in sorted(root.glob("*/summary.json")):
        s = json.loads(summary.read_text())
        log = summary.parent / "log.jsonl"
        s["run"] = summary.parent.name
        s["log"] = [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.exists() else []
        runs.append(s)
    return runs


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", type=pathlib.Path)
    ap.add_argument("--json", type=pathlib.Path)
    ap.add_argument("--png", type=pathlib.Path)
    a = ap.parse_args()
    runs = load_runs(a.runs)
    if not runs:
        sys.exit(f"recipe_table.py: no */summary.json under {a.runs}")
    print("| run | storage | optimizer | val loss before | val loss after | HF reference | difference | "
          "frozen MiB | tokens/s | peak GPU MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    worst = 0.0
    for r in runs:
        ref = HF_REFERENCE.get(r["storage"])
        diff = r["val_loss_after"] - ref if ref is not None else None
        if diff is not None:
            worst = max(worst, abs(diff))
        print(f"| {r['run']} | {r['storage']} | {r['optim']} | {r['val_loss_before']:.3f} | {r['val_loss_after']:.3f} | "
              f"{'' if ref is None else f'{ref:.3f}'} | {'' if diff is None else f'{diff:+.3f}'} | "
              f"{r['frozen_bytes'] / 2**20:.1f} | {r['tokens_per_s']:.0f} | {r['peak_mem_mb']:.0f} |")
    print(f"\nlargest |difference| from the reference: {worst:.3f} nats/token (bar: {TOLERANCE})")
    if a.json:
        keep = ("step", "loss", "val_loss", "grad_norm", "tokens_per_s")
        slim = [dict(r, log=[{k: e[k] for k in keep if k in e} for e in r["log"]]) for r in runs]
        a.json.write_text(json.dumps(slim) + "\n")
    if a.png:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for r in runs:
            pts = [(e["step"], e["val_loss"]) for e in r["log"] if "val_loss" in e]
            pts.insert(0, (0, r["val_loss_before"]))
            ax.plot(*zip(*pts), marker="o", ms=3, label=f"{r['storage']} ({r['optim']})")
        ax.axhline(4.99, color="gray", ls=":", lw=1, label="HF stack ≈ 4.99")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("validation loss (nats/token)")
        ax.set_title(f"kjv15M → tinyshakespeare, QLoRA recipe on {runs[0]['device']}")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(a.png, dpi=110)
    return 0 if worst <= TOLERANCE else 1


if __name__ == "__main__":
    sys.exit(main())
