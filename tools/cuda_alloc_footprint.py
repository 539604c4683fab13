#!/usr/bin/env python3
"""How much device memory one cudaMalloc of a given size takes (chapter 7, "qlora plan against
the measured peak"): 256 allocations of each size through CuPy's raw runtime binding (no
caching allocator), the change in cudaMemGetInfo's memory in use divided by their number.
Run on the GPU machine; prints one line per size and writes JSON with --json."""
import argparse
import json

import cupy as cp

rt = cp.cuda.runtime


def used():
    free, total = rt.memGetInfo()
    return total - free


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    a = ap.parse_args()
    MiB = 1 << 20
    sizes = [4096, 64 << 10, 256 << 10, 512 << 10, MiB, MiB + 4096, 2 * MiB, int(2.6875 * MiB), 3 * MiB, 5 * MiB,
             int(5.375 * MiB), 8 * MiB, 21 * MiB]
    rows = []
    for size in sizes:
        base = used()
        ptrs = [rt.malloc(size) for _ in range(256)]
        per = (used() - base) / 256
        for p in ptrs:
            rt.free(p)
        rows.append({"bytes": size, "footprint_bytes": per})
        print(f"{size / MiB:10.4f} MiB -> {per / MiB:8.4f} MiB each")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
