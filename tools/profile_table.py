#!/usr/bin/env python3
"""Where one training step's (or decode step's) GPU time goes: groups the kernels of an Nsight
Compute CSV (`ncu --nvtx --csv --page raw --metrics gpu__time_duration.sum`, scripts/gpu_profile.sh,
or scripts/gpu_all.sh genprofile for `qlora generate --max-tokens 2`: a prefill and one decode
step, which launch the same kernels) by what they do. A kernel launched inside one of the model's NVTX ranges (kernels/nvtx_range.cuh:
base, lora, attention, head, optimizer) goes to the innermost range; the others are named by
their kernel. Only the kernels of the last training step are counted: the bench runs one
warm-up step and one profiled step, so the training kernels after loading split into two
equal halves and the second one is kept.

Usage: profile_table.py NCU_CSV [--json OUT]"""
import argparse
import csv
import io
import json
import re
import sys

RANGES = ["base", "lora", "attention", "head", "optimizer"]
# Kernels outside the ranges, by name: what the rest of a layer does. The first pattern that
# matches names the group, so decoding's fused kernels count where their name starts:
# rmsnorm_rounded (the residual add and the BF16 rounding too) under norms, rope_kv_write (the
# cache writes too) under rope, swiglu's and attention's BF16 copies under theirs.
BY_NAME = [("rmsnorm", "norms"), ("rope", "rope"), ("swiglu", "swiglu"), ("add_kernel", "residual adds"),
           ("to_bf16", "BF16 rounding"), ("embedding", "embedding"), ("memcpy|memset", "copies"),
           ("attention_cached|kv_cache", "attention (cached)"), ("argmax", "sampling")]
LOAD = re.compile(r"random_bf16|quantize4_kernel|quantize_nested")


def rows(path):
    text = open(path, encoding="utf-8", errors="replace").read()
    start = text.find('"ID"')
    if start < 0:
        sys.exit(f"{path}: no ncu CSV header (\"ID\", ...) found")
    reader = csv.reader(io.StringIO(text[start:]))
    header = next(reader)
    out = []
    for r in reader:
        if len(r) != len(header) or not r[0].isdigit():
            continue  # the units row, ncu's own messages
        out.append(dict(zip(header, r)))
    return header, out


def category(row, nvtx_cols):
    ctx = " ".join(row[c] for c in nvtx_cols)
    best, pos = None, -1
    for name in RANGES:
        for m in re.finditer(r"\b%s\b" % name, ctx):
            if m.start() > pos:
                best, pos = name, m.start()
    if best:
        return best
    kernel = row["Kernel Name"]
    for pat, cat in BY_NAME:
        if re.search(pat, kernel, re.I):
            return cat
    return "other: " + kernel.split("(")[0][:60]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("csv")
    ap.add_argument("--json")
    a = ap.parse_args()
    header, data = rows(a.csv)
    nvtx_cols = [h for h in header if "nvtx" in h.lower() or "range" in h.lower()]
    if not nvtx_cols:
        print("note: no NVTX column in the CSV; header:", header)
    unit_ns = 1.0  # gpu__time_duration.sum is in ns (usecond/msecond if ncu rescaled it)
    key = next((h for h in header if h.startswith("gpu__time_duration")), None)
    if key is None:
        sys.exit("no gpu__time_duration column")
    last_load = max((i for i, r in enumerate(data) if LOAD.search(r["Kernel Name"])), default=-1)
    train = data[last_load + 1:]
    step = train[len(train) // 2:]
    total = 0.0
    cats, kernels = {}, {}
    for r in step:
        t = float(r[key].replace(",", "")) * unit_ns
        total += t
        c = category(r, nvtx_cols)
        cats[c] = cats.get(c, 0.0) + t
        k = (c, r["Kernel Name"].split("(")[0][:90], r.get("Grid Size", ""))
        n, s = kernels.get(k, (0, 0.0))
        kernels[k] = (n + 1, s + t)
    print(f"{len(data)} kernels profiled, {len(train)} after loading, {len(step)} in the last step; "
          f"sum of kernel durations {total / 1e6:.2f} ms")
    print(f"{'what':<34} {'ms':>9} {'share':>7}")
    for c, t in sorted(cats.items(), key=lambda x: -x[1]):
        print(f"{c:<34} {t / 1e6:>9.3f} {100 * t / total:>6.1f}%")
    print("\ntop kernels (category, name, grid: launches, ms)")
    top = sorted(kernels.items(), key=lambda x: -x[1][1])[:30]
    for (c, name, grid), (n, t) in top:
        print(f"  {c:<11} {name[:70]:<70} {grid:<16} {n:>4} {t / 1e6:>8.3f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"step_kernel_ms": total / 1e6, "kernels_in_step": len(step),
                       "categories_ms": {c: t / 1e6 for c, t in cats.items()},
                       "top": [{"category": c, "kernel": name, "grid": g, "launches": n, "ms": t / 1e6}
                               for (c, name, g), (n, t) in top]}, f, indent=2)


if __name__ == "__main__":
    main()
