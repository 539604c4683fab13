#!/usr/bin/env python3
"""Fixtures for chapters 1-3: the numbers where PyTorch's own float32 arithmetic decides
bitsandbytes' result, computed with torch, so the C++ tests can compare against them.

Writes into tests/fixtures/quant/ (or --out):
  dynamic_map_signed.f32, dynamic_map_unsigned.f32
      bitsandbytes' create_dynamic_map(signed, max_exponent_bits=7, total_bits=8), built
      here with torch exactly as bitsandbytes builds it (torch.linspace in float32 on the
      CPU, float32 means, float32 products with the scalar 10**(i-6)); 256 float32 LE.
  absmax_mean_input.f32, absmax_mean.json
      a seeded float32 vector shaped like an absmax vector and torch.mean() of it on the
      CPU and (when present) on CUDA: the double-quantization offset.
  manifest.json
      torch version, CPU capability and device used.

bitsandbytes' own outputs are made by tools/bnb_compare.py (tests/fixtures/bnb/).

Run it from the repository root on a machine with PyTorch (a GPU is needed for the
CUDA mean):  python3 tools/make_quant_fixtures.py
"""
import argparse
import json
import pathlib
import sys

import torch


def create_dynamic_map(signed: bool, max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    # The construction of bitsandbytes' functional.create_dynamic_map (current main),
    # restated: non_sign_bits = total_bits - 1, no additional items for 7 exponent bits.
    data = []
    non_sign_bits = total_bits - 1
    for i in range(max_exponent_bits):
        items = 2 ** (i + non_sign_bits - max_exponent_bits) + 1 if signed else 2 ** (i + non_sign_bits - max_exponent_bits + 1) + 1
        boundaries = torch.linspace(0.1, 1, int(items), dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        if signed:
            data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    data.append(0)
    data.append(1.0)
    assert len(data) == 2**total_bits, len(data)
    data.sort()
    return torch.tensor(data, dtype=torch.float32)


def write(path: pathlib.Path, t: torch.Tensor) -> None:
    t = t.detach().contiguous().cpu()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    path.write_bytes(t.numpy().tobytes())
    print(f"wrote {path} ({path.stat().st_size} bytes)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="tests/fixtures/quant", help="output directory")
    args = ap.parse_args()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available()
    manifest = {
        "torch": torch.__version__,
        "cpu_capability": getattr(torch.backends.cpu, "get_cpu_capability", lambda: "unknown")(),
        "cuda_device": torch.cuda.get_device_name(0) if cuda else None,
    }

    write(out / "dynamic_map_signed.f32", create_dynamic_map(True))
    write(out / "dynamic_map_unsigned.f32", create_dynamic_map(False))

    g = torch.Generator().manual_seed(20230523)
    n = 16411  # a 1.05M-parameter tensor at blocksize 64, plus an odd tail
    absmax = (torch.rand(n, generator=g, dtype=torch.float32) * 0.08 + 0.02).contiguous()
    write(out / "absmax_mean_input.f32", absmax)
    meta = {"n": n, "torch_cpu_mean": absmax.mean().item(), "torch_cuda_mean": absmax.cuda().mean().item() if cuda else None}
    (out / "absmax_mean.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(f"wrote {out / 'absmax_mean.json'}: {meta}")

    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    print(f"wrote {out / 'manifest.json'}: {manifest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
