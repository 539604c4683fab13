#!/usr/bin/env python3
"""Chapter 7's storage table from the runs of scripts/gpu_recipe.sh and tools/hf_recipe.py.

Usage: tools/recipe_table.py RUNS_DIR [--hf HF_DIR] [--json OUT.json] [--png OUT.png]

Reads RUNS_DIR/*/summary.json and log.jsonl (written by `qlora finetune`; a run named
RUN-seedS is RUN with --seed S, a bare RUN is the default seed 1337) and HF_DIR/*.json
(tools/hf_recipe.py: RUN-seedS.json). Prints a Markdown table per run: frozen bytes,
validation loss before and after, the spread of "after" over our seeds, the Hugging Face
stack's "after" at the same seed (the same windows), and the difference; optionally writes
it all as one JSON file (docs/bench/finetune-recipe-*.json) and a plot of the
validation-loss curves. Exits 1 when a difference from the Hugging Face stack exceeds
the chapter's bar of 0.05 nats/token.
"""
import argparse
import collections
import json
import pathlib
import re
import statistics
import sys

TOLERANCE = 0.05  # nats/token: the bar for "matches the reference stack"
DEFAULT_SEED = 1337


def split_name(name):
    m = re.fullmatch(r"(.*)-seed(\d+)", name)
    return (m.group(1), int(m.group(2))) if m else (name, DEFAULT_SEED)


def load_ours(root):
    runs = collections.defaultdict(dict)
    for summary in sorted(root.glob("*/summary.json")):
        s = json.loads(summary.read_text())
        log = summary.parent / "log.jsonl"
        s["log"] = [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.exists() else []
        run, seed = split_name(summary.parent.name)
        runs[run][seed] = s
    return runs


def load_hf(root):
    runs = collections.defaultdict(dict)
    for f in sorted(root.glob("*.json")) if root else []:
        s = json.loads(f.read_text())
        run, seed = split_name(f.stem)
        runs[run][seed] = s
    return runs


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", type=pathlib.Path)
    ap.add_argument("--hf", type=pathlib.Path)
    ap.add_argument("--json", type=pathlib.Path)
    ap.add_argument("--png", type=pathlib.Path)
    a = ap.parse_args()
    ours, hf = load_ours(a.runs), load_hf(a.hf)
    if not ours:
        sys.exit(f"recipe_table.py: no */summary.json under {a.runs}")
    print("| run | frozen MiB | val loss before | after, seed 1337 | after over seeds: mean (min–max, n) | "
          "HF stack, seed 1337 | ours − HF |")
    print("|---|---|---|---|---|---|---|")
    worst, rows = 0.0, []
    for run, by_seed in sorted(ours.items()):
        afters = [s["val_loss_after"] for s in by_seed.values()]
        base = by_seed.get(DEFAULT_SEED) or next(iter(by_seed.values()))
        ref = hf.get(run, {}).get(DEFAULT_SEED)
        diff = base["val_loss_after"] - ref["val_loss_after"] if ref and DEFAULT_SEED in by_seed else None
        if diff is not None:
            worst = max(worst, abs(diff))
        rows.append({"run": run, "storage": base["storage"], "optim": base["optim"],
                     "frozen_bytes": base["frozen_bytes"], "val_loss_before": base["val_loss_before"],
                     "val_loss_after": {str(k): v["val_loss_after"] for k, v in sorted(by_seed.items())},
                     "hf_val_loss_after": {str(k): v["val_loss_after"] for k, v in sorted(hf.get(run, {}).items())},
                     "difference": diff})
        at_default = f"{by_seed[DEFAULT_SEED]['val_loss_after']:.4f}" if DEFAULT_SEED in by_seed else "—"
        hf_after = "—" if ref is None else f"{ref['val_loss_after']:.4f}"
        print(f"| {run} | {base['frozen_bytes'] / 2**20:.1f} | {base['val_loss_before']:.3f} | {at_default} | "
              f"{statistics.mean(afters):.4f} ({min(afters):.4f}–{max(afters):.4f}, {len(afters)}) | {hf_after} | "
              f"{'' if diff is None else f'{diff:+.4f}'} |")
    print(f"\nlargest |ours − HF| at the same seed: {worst:.4f} nats/token (bar: {TOLERANCE})")
    if a.json:
        keep = ("step", "loss", "val_loss", "grad_norm")

        def slim_log(s):
            return dict(s, log=[{k: round(e[k], 5) if isinstance(e[k], float) else e[k] for k in keep if k in e}
                                for e in s["log"]])

        slim = {"table": rows,
                "ours": {run: {str(seed): slim_log(s) for seed, s in by_seed.items()} for run, by_seed in ours.items()},
                "hf": {run: {str(seed): slim_log(s) for seed, s in by_seed.items()} for run, by_seed in hf.items()}}
        a.json.write_text(json.dumps(slim) + "\n")
    if a.png:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for i, (run, by_seed) in enumerate(sorted(ours.items())):
            s = by_seed.get(DEFAULT_SEED)
            if s is None:
                continue
            pts = [(0, s["val_loss_before"])] + [(e["step"], e["val_loss"]) for e in s["log"] if "val_loss" in e]
            line, = ax.plot(*zip(*pts), marker="o", ms=3, label=f"{run} (ours)")
            ref = hf.get(run, {}).get(DEFAULT_SEED)
            if ref:
                pts = sorted((int(k), v) for k, v in ref["val_losses"].items())
                ax.plot(*zip(*pts), ls="--", color=line.get_color(), lw=1, label=f"{run} (HF stack)")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("validation loss (nats/token)")
        ax.set_title(f"kjv15M → tinyshakespeare, QLoRA recipe on {next(iter(ours.values()))[DEFAULT_SEED]['device']}"
                     if all(DEFAULT_SEED in b for b in ours.values()) else "kjv15M → tinyshakespeare, QLoRA recipe")
        ax.legend(fontsize=7, ncol=2)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(a.png, dpi=110)
    return 0 if worst <= TOLERANCE else 1


if __name__ == "__main__":
    sys.exit(main())
