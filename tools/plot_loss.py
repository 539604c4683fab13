#!/usr/bin/env python3
"""Loss curve of a `qlora finetune` run (chapter 7).

Usage:
    python3 tools/plot_loss.py OUT_DIR/log.jsonl OUT.png [--title TEXT] [--summary FILE]

Reads the JSONL log that `qlora finetune` writes (one JSON object per optimizer
step: "step", "loss", "lr", ..., and "val_loss" on the steps where it validated)
and draws the training loss of every step, its running mean over 10 steps, and the
validation points. The validation loss before training, "val_loss_before" of the
summary.json that `qlora finetune` writes next to the log (or of --summary FILE), is
drawn at step 0. Needs only matplotlib (Debian
python3-matplotlib, installed by scripts/setup.sh); renders headless (Agg).
notebooks/07-finetune.ipynb imports plot_loss() from here.
"""
import argparse
import json
import math
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)


def read_log(path):
    """The log's records, in order; exits with a message naming the file and line on bad input."""
    records = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
                float(r["loss"])
                int(r["step"])
            except (ValueError, KeyError, TypeError) as e:
                sys.exit(f"{path}:{n}: not a qlora finetune log record ({e})")
            records.append(r)
    if not records:
        sys.exit(f"{path}: no records")
    return records


def val_before(summary):
    """Validation loss before training from a finetune summary.json, or None (no file, or a resumed run)."""
    if summary is None or not Path(summary).is_file():
        return None
    v = json.loads(summary.read_text()).get("val_loss_before", -1)
    return v if v is not None and v >= 0 else None


def plot_loss(records, out_png, title=None, before=None):
    """Draws training loss per step and validation points; saves out_png; returns the figure."""
    steps = [r["step"] for r in records]
    loss = [r["loss"] for r in records]
    window = 10
    mean = [sum(loss[max(0, i - window + 1):i + 1]) / (i + 1 - max(0, i - window + 1)) for i in range(len(loss))]
    val = [(r["step"], r["val_loss"]) for r in records if r.get("val_loss", -1) >= 0]
    if before is not None:
        val.insert(0, (0, before))

    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(steps, loss, color="tab:blue", alpha=0.35, lw=1, label="training loss (each step)")
    ax.plot(steps, mean, color="tab:blue", lw=2, label=f"training loss (mean of last {window})")
    if val:
        ax.plot([s for s, _ in val], [v for _, v in val], "o-", color="tab:red", label="validation loss")
        for s, v in val:
            ax.annotate(f"{v:.2f}\n(ppl {math.exp(v):.0f})", (s, v), textcoords="offset points", xytext=(0, 8),
                        ha="center", fontsize=8, color="tab:red")
    ax.margins(x=0.03, y=0.15)  # room for the labels above the points
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title or "qlora finetune")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    Path(out_png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    return fig


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("log", help="log.jsonl written by qlora finetune")
    p.add_argument("out", help="PNG to write")
    p.add_argument("--title", help="plot title")
    p.add_argument("--summary", help="finetune summary.json (default: the one next to the log, if any)")
    a = p.parse_args()
    records = read_log(a.log)
    plot_loss(records, a.out, a.title, val_before(a.summary or Path(a.log).with_name("summary.json")))
    print(f"{a.out}: {len(records)} steps, final training loss {records[-1]['loss']:.4f}")


if __name__ == "__main__":
    main()
