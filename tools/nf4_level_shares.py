#!/usr/bin/env python3
"""Share of values that each NF4 level receives (chapter 2, "Why it works").

Standard library only. Two inputs:
  * blocks: 4096 blocks of 64 values from N(0, 1), each divided by its own absmax
    (what NF4 really sees after blockwise scaling);
  * ideal: N(0, 1) values divided by Phi^-1(delta) = 1.848 (the scaling the
    quantile construction assumes), clipped to [-1, 1].
A value gets the nearest level (ties do not matter for continuous data).

    python3 tools/nf4_level_shares.py [--blocks 4096] [--blocksize 64] [--seed 1234]
"""
import argparse
import json
import random
from statistics import NormalDist

# bitsandbytes' NF4 table (chapter 2), codes 0..15.
NF4 = [-1.0, -0.6961928, -0.5250731, -0.3949175, -0.2844414, -0.1847734,
       -0.0910500, 0.0, 0.0795803, 0.1609302, 0.2461123, 0.3379152,
       0.4407098, 0.5626170, 0.7229568, 1.0]
MIDS = [(a + b) / 2 for a, b in zip(NF4, NF4[1:])]
DELTA = 0.9677083


def code(x):
    c = 0
    while c < 15 and x > MIDS[c]:
        c += 1
    return c


def ideal_shares():
    n = NormalDist()
    q = n.inv_cdf(DELTA)
    edges = [-float("inf")] + [m * q for m in MIDS] + [float("inf")]
    return [n.cdf(b) - n.cdf(a) for a, b in zip(edges, edges[1:])]


def block_shares(blocks, blocksize, seed):
    rng = random.Random(seed)
    counts = [0] * 16
    absmax_sum = 0.0
    for _ in range(blocks):
        xs = [rng.gauss(0.0, 1.0) for _ in range(blocksize)]
        m = max(abs(x) for x in xs)
        absmax_sum += m
        for x in xs:
            counts[code(x / m)] += 1
    total = blocks * blocksize
    return [c / total for c in counts], absmax_sum / blocks


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--blocks", type=int, default=4096)
    ap.add_argument("--blocksize", type=int, default=64)
    ap.add_argument("--seed", type=int, default=1234)
    a = ap.parse_args()
    ideal = ideal_shares()
    real, mean_absmax = block_shares(a.blocks, a.blocksize, a.seed)
    print("code  level       ideal N(0,1)/1.848   blocks x/absmax")
    for c in range(16):
        print(f"{c:4d}  {NF4[c]:+.7f}  {100 * ideal[c]:8.2f} %        {100 * real[c]:8.2f} %")
    print(f"mean block absmax {mean_absmax:.3f} sigma; shares over blocks "
          f"{100 * min(real):.2f}-{100 * max(real):.2f} %, ideal {100 * min(ideal):.2f}-{100 * max(ideal):.2f} %")
    print(json.dumps({"blocks": a.blocks, "blocksize": a.blocksize, "seed": a.seed,
                      "mean_absmax": mean_absmax, "ideal": ideal, "blocks_shares": real}))


if __name__ == "__main__":
    main()
