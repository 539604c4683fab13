#!/usr/bin/env python3
"""qlora plan against the measured peak (chapter 7, "Planning a run"): for every
`qlora bench train` record in docs/bench (train-*-DEVICE.json), asks `qlora plan --batch` for
the same shape and settings and writes both, with the measured breakdown, to
docs/bench/plan-vs-measured-DEVICE.json (what notebooks/07-scaling.ipynb plots).

Usage: plan_vs_measured.py QLORA_BINARY [--device h200]"""
import argparse
import json
import subprocess
from pathlib import Path

root = Path(__file__).resolve().parent.parent


def plan_for(qlora, run):
    shape = run["shape"]
    if "/" in shape:  # a folder written by the bench: /tmp/m7b, /tmp/m13b
        shape = Path(shape).name.removeprefix("m")
    args = [qlora, "plan", "--model", shape, "--batch", str(run["batch"]), "--seq-len", str(run["seq_len"]),
            "-r", str(run["rank"]), "--dropout", str(run["dropout"]), "--storage", run["storage"],
            "--optim", run["optim"], "--json"]
    if not run.get("gradient_checkpointing", True):
        args.append("--no-checkpointing")
    if run.get("offload_checkpoints"):
        args.append("--offload-checkpoints")
    if run["optimizer_states"] == "host":
        args.append("--states-on-host")
    return json.loads(subprocess.check_output(args))["training_plans"][0]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("qlora")
    ap.add_argument("--device", default="h200")
    a = ap.parse_args()
    rows = []
    for path in sorted((root / "docs" / "bench").glob(f"train-*-{a.device}.json")):
        run = json.loads(path.read_text())
        if run.get("float_math", "tf32") != "tf32":
            continue  # the same memory as its TF32 twin
        plan = plan_for(a.qlora, run)
        groups = {}
        for item in plan["items"]:
            groups[item["group"]] = groups.get(item["group"], 0.0) + item["bytes"] / 2**30
        measured = run["memory_gib"]["peak_in_use"]
        predicted = plan["total_bytes"] / 2**30
        rows.append({"run": path.name, "parameters": run["parameters"], "batch": run["batch"],
                     "memory_limit_gib": run.get("memory_limit_gib", 0),
                     "offload_checkpoints": run.get("offload_checkpoints", False),
                     "optimizer_states": run["optimizer_states"], "tokens_per_s": run["tokens_per_s"],
                     "measured_gib": measured, "measured": run["memory_gib"], "plan_gib": predicted,
                     "plan_groups_gib": groups, "measured_over_plan": measured / predicted})
        print(f"{path.name:36s} measured {measured:6.2f} GiB, plan {predicted:6.2f} GiB, ratio {measured / predicted:.3f}")
    out = root / "docs" / "bench" / f"plan-vs-measured-{a.device}.json"
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(rows, indent=2) + "\n")
    tmp.replace(out)  # atomic: a reader never sees half a file
    print("wrote", out)


if __name__ == "__main__":
    main()
