#!/usr/bin/env python3
"""bitsandbytes' quantize_4bit as fixtures, and the GPU reciprocal it depends on (chapter 3,
"The same quantization? Against the real library"). Runs on the GPU machine: python3 with
torch + CUDA, safetensors, numpy and cupy.

1. Builds bitsandbytes from the anchor tarball (../shared/anchors/README.md) unless a build
   is already there, and imports it.
2. Measures rcp.approx.ftz.f32 (what nvcc --use_fast_math makes of `1.0f / x`) for the 128
   BF16 mantissas 1 + k/128 with a one-line CUDA kernel (cupy), checks that every normal
   exponent only shifts the result, and writes the table as C++ (--table-out).
3. For NF4/FP4 x blocksizes 64..4096 x double quantization off/on x input BF16/F16/F32,
   runs bitsandbytes.functional.quantize_4bit and dequantize_4bit on seeded inputs: normal
   values of a weight's scale, an all-zero block, and blocks built so that x / absmax lands
   exactly on the decision midpoints (FP4's p/q thresholds; float neighbours of absmax *
   threshold for NF4 and FP4). Writes tests/fixtures/bnb/bnb_<dtype>.safetensors.
4. Confirms the instruction: predicts bitsandbytes' codes from its own absmax with the
   measured rcp.approx and with the IEEE quotient; the first must match every code.

Fixture tensors (per dtype file; B = blocksize, Q = nf4 | fp4):
  input.bsB            the input, shape [N], in the file's dtype
  Q.bsB.packed         U8 [(N+1)/2], the 4-bit codes (identical with and without DQ: checked)
  Q.bsB.absmax         F32 [blocks]
  Q.bsB.dequant        dequantize_4bit output, the input dtype
  Q.bsB.dq.absmax_code U8 [blocks]; Q.bsB.dq.nested_absmax F32 [ceil(blocks/256)];
  Q.bsB.dq.offset      F32 [1] (torch's absmax.mean() on the GPU); Q.bsB.dq.dequant
rcp_approx.safetensors: rcp_bf16_mantissa I32 [128] (float32 bits).

Usage (repository root): python3 tools/bnb_compare.py [--tarball PATH] [--out DIR]
"""
import argparse
import json
import pathlib
import subprocess
import sys
import time
from fractions import Fraction

import numpy as np

BLOCKSIZES = (64, 128, 256, 512, 1024, 2048, 4096)
DTYPES = ("bf16", "f16", "f32")


def float32_literal(text: str) -> np.float32:
    """What a C++ or CUDA compiler makes of the literal `<text>f`: the decimal rounded once,
    straight to float32. np.float32(float(text)) rounds twice, to double and then to float32,
    and gets 4 of bitsandbytes' 15 NF4 constants one ulp wrong: they are midpoints of float32
    table values printed to 16 digits, so the nearest double is the float32 tie itself and
    the second rounding goes to even, not to the side the decimal lies on."""
    exact = Fraction(text)
    near = np.float32(float(exact))  # within one ulp of the right answer
    candidates = (np.nextafter(near, np.float32(-np.inf)), near, np.nextafter(near, np.float32(np.inf)))
    return min(candidates, key=lambda c: abs(Fraction(float(c)) - exact))


# Facts from bitsandbytes' csrc/kernels.cu (dQuantizeFP4 / dQuantizeNF4): the float literals
# the decision trees compare with, ascending, as nvcc rounds them (the same bits are in the
# PTX, and src/nf4.cpp has the same literals), and FP4's code for each rank.
FP4_THRESHOLDS = np.array([float32_literal(t) for t in (
    "0.00260417", "0.0859375", "0.20833333", "0.29166667", "0.4166667", "0.583333", "0.8333333")], dtype=np.float32)
FP4_CODE_OF_RANK = np.array([0, 1, 6, 7, 4, 5, 2, 3], dtype=np.uint8)
NF4_THRESHOLDS = np.array([float32_literal(t) for t in (
    "-0.8480964004993439", "-0.6106329262256622", "-0.4599952697753906", "-0.33967943489551544",
    "-0.23460740596055984", "-0.13791173323988914", "-0.045525018125772476", "0.03979014977812767",
    "0.1202552504837513", "0.2035212516784668", "0.2920137718319893", "0.3893125355243683",
    "0.5016634166240692", "0.6427869200706482", "0.8614784181118011")], dtype=np.float32)
# FP4's midpoints as fractions p/q of the absmax: 1/384, 11/128, 5/24, 7/24, 5/12, 7/12, 5/6.
FP4_MIDPOINTS = ((1, 384), (11, 128), (5, 24), (7, 24), (5, 12), (7, 12), (5, 6))


def log(msg):
    print(msg, flush=True)


def build_bitsandbytes(tarball: pathlib.Path, root: pathlib.Path) -> None:
    """The build of ../shared/anchors/README.md (CUDA backend for sm_90, --use_fast_math), by
    scripts/build_bnb.sh into /tmp/bnb, with the package metadata torch looks for in /tmp/site."""
    if not tarball.is_file():
        sys.exit(f"bnb_compare.py: tarball {tarball} not found (--tarball)")
    t0 = time.time()
    subprocess.run(["bash", str(pathlib.Path(__file__).resolve().parent.parent / "scripts" / "build_bnb.sh"),
                    str(tarball)], check=True)
    log(f"bitsandbytes ready in {time.time() - t0:.0f} s")
    sys.path[:0] = [str(root / "site"), str(root / "bnb")]


# ---------------------------------------------------------------------------------------------
# The reciprocal, measured.

RCP_SOURCE = r'''
extern "C" __global__ void rcp_approx(const float* x, float* out, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(out[i]) : "f"(x[i]));
}
'''


def make_rcp_on_gpu():
    import cupy
    kernel = cupy.RawKernel(RCP_SOURCE, "rcp_approx")

    def rcp(x: np.ndarray) -> np.ndarray:
        d_x = cupy.asarray(np.ascontiguousarray(x, dtype=np.float32))
        d_out = cupy.empty_like(d_x)
        n = d_x.size
        kernel(((n + 255) // 256,), (256,), (d_x, d_out, np.int32(n)))
        return cupy.asnumpy(d_out)
    return rcp


def rcp_from_table(x: np.ndarray, table_bits: np.ndarray) -> np.ndarray:
    """The CPU's rule (src/fast_math_reciprocal.cpp) for BF16 normal values: the mantissa's
    entry shifted by the exponent, flushed to zero below FLT_MIN."""
    bits = x.view(np.uint32)
    exponent = ((bits >> 23) & 0xFF).astype(np.int32)
    r = table_bits[(bits >> 16) & 0x7F].view(np.float32).astype(np.float64)
    out = np.ldexp(r, 127 - exponent).astype(np.float32)
    out[np.abs(out) < np.finfo(np.float32).tiny] = 0.0
    return np.copysign(out, x)


def measure_reciprocal(rcp) -> tuple[np.ndarray, dict]:
    mantissas = (1.0 + np.arange(128, dtype=np.float64) / 128.0).astype(np.float32)
    table = rcp(mantissas).view(np.uint32).copy()
    ieee = (np.float32(1.0) / mantissas).view(np.uint32)
    # Every normal BF16 value, both signs: the exponent must only shift the mantissa's entry.
    exps = np.arange(1, 255, dtype=np.uint32)
    all_bf16 = (((exps[:, None] << 23) | (np.arange(128, dtype=np.uint32)[None, :] << 16)).ravel())
    all_bf16 = np.concatenate([all_bf16, all_bf16 | 0x80000000]).view(np.float32)
    shifted_ok = np.array_equal(rcp(all_bf16).view(np.uint32), rcp_from_table(all_bf16, table).view(np.uint32))
    info = {
        "rcp_entries_not_ieee": int((table != ieee).sum()),
        "rcp_max_ulp_from_ieee": int(np.abs(table.astype(np.int64) - ieee.astype(np.int64)).max()),
        "rcp_exponent_only_shifts": bool(shifted_ok),
    }
    log(f"rcp.approx.ftz.f32 on 1 + k/128: {info}")
    if not shifted_ok:
        sys.exit("bnb_compare.py: rcp.approx of a BF16 value is not its mantissa's entry shifted by the exponent")
    return table, info


def write_table_cpp(path: pathlib.Path, table: np.ndarray, device: str) -> None:
    rows = [", ".join(f"0x{int(b):08x}u" for b in table[i:i + 8]) for i in range(0, 128, 8)]
    body = "\n".join(f"    {r}," for r in rows)
    path.write_text(f"""// Generated by tools/bnb_compare.py: rcp.approx.ftz.f32(1 + k/128), k = 0..127, as float32
// bits, measured on {device} (the instruction nvcc --use_fast_math emits for 1.0f / x).
// The GPU test "the reciprocal table is the device's rcp.approx" measures it again.
#include "fast_math_reciprocal.hpp"

namespace qlora {{

const std::array<std::uint32_t, 128> rcp_approx_bf16_mantissa_bits = {{
{body}
}};

}}  // namespace qlora
""")
    log(f"wrote {path}")


# ---------------------------------------------------------------------------------------------
# Inputs.

def representable(v: np.ndarray, dtype: str) -> np.ndarray:
    """Which float64 values the dtype holds exactly."""
    import torch
    f32 = v.astype(np.float32)
    back = torch.from_numpy(f32).to({"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}[dtype])
    return (f32.astype(np.float64) == v) & (back.float().numpy() == f32)


def tie_block(n: int, dtype: str, rng: np.random.Generator, serial: int) -> np.ndarray:
    """A block whose absmax A and values x make x / A an FP4 midpoint p/q exactly
    (A = 384·s·2^e, x = p·(384/q)·s·2^e, whichever of them the dtype holds), plus the
    float32 neighbours of A·t for every FP4 and NF4 threshold constant t."""
    bits = {"bf16": 8, "f16": 11, "f32": 24}[dtype]
    # BF16: every odd s with 3·s in the 8-bit significand, in turn (43 absmax mantissas);
    # F16/F32: a random odd s small enough that 33·s (the 11/128 midpoint) fits too.
    max_s = ((1 << bits) - 1) // (3 if dtype == "bf16" else 33)
    odd_count = (max_s + 1) // 2
    s = 2 * (serial % odd_count if dtype == "bf16" else int(rng.integers(0, odd_count))) + 1
    unit = np.ldexp(1.0, int(rng.integers(-15, -11)) - int(np.log2(s)))  # A = 384·s·unit ≈ 0.01 .. 0.1
    absmax = 384.0 * s * unit
    ties = [p * (384 // q) * s * unit for p, q in FP4_MIDPOINTS]
    a32 = np.float32(absmax)
    for t in np.concatenate([FP4_THRESHOLDS, np.abs(NF4_THRESHOLDS)]):
        near = np.float32(a32 * t)
        ties += [near, np.nextafter(near, np.float32(0)), np.nextafter(near, np.float32(1))]
    ties = np.array(ties, dtype=np.float64)
    ties = ties[representable(ties, dtype) & (ties < absmax)].astype(np.float32)
    block = np.resize(np.concatenate([ties, -ties]), n).astype(np.float32)
    block[0] = a32 if serial % 2 == 0 else -a32
    return block


def make_input(blocksize: int, dtype: str, seed: int) -> np.ndarray:
    """Odd length with a partial last block: block 0 normal (with a subnormal and a -0),
    block 1 zeros, then tie blocks and normal blocks in turn."""
    rng = np.random.default_rng(seed)
    n = max(2001, 2 * blocksize + blocksize // 2 + 1)
    x = (rng.standard_normal(n) * 0.02).astype(np.float32)
    x[3], x[5], x[9] = 1e-40, -0.0, 3e-6  # float32 subnormal; negative zero; an F16 subnormal
    for b, begin in enumerate(range(0, n, blocksize)):
        end = min(begin + blocksize, n)
        if b == 1:
            x[begin:end] = 0.0
        elif b >= 2 and b % 2 == 0:
            x[begin:end] = tie_block(end - begin, dtype, rng, b // 2)
    return x


# ---------------------------------------------------------------------------------------------
# Codes predicted from bitsandbytes' absmax, to tell the reciprocals apart.

def flush(v: np.ndarray) -> np.ndarray:
    return np.where(np.abs(v) < np.finfo(np.float32).tiny, np.float32(0) * np.sign(v), v).astype(np.float32)


def encode(quant_type: str, scaled: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore"):
        if quant_type == "nf4":
            return (scaled[:, None] > NF4_THRESHOLDS[None, :]).sum(axis=1).astype(np.uint8)
        rank = (np.abs(scaled)[:, None] > FP4_THRESHOLDS[None, :]).sum(axis=1)
        return FP4_CODE_OF_RANK[rank] | np.where(scaled < 0, 8, 0).astype(np.uint8)


def nibbles(a: np.ndarray, b: np.ndarray) -> int:
    """Number of differing 4-bit codes between two packed arrays."""
    return int(((a >> 4) != (b >> 4)).sum() + ((a & 15) != (b & 15)).sum())


def predicted_codes(x: np.ndarray, absmax: np.ndarray, inv: np.ndarray, quant_type: str, blocksize: int) -> np.ndarray:
    xf = flush(x.astype(np.float32))
    with np.errstate(invalid="ignore", over="ignore"):
        scaled = flush(xf * np.repeat(inv, blocksize)[: x.size])
    codes = encode(quant_type, scaled)
    if codes.size % 2:
        codes = np.append(codes, encode(quant_type, np.zeros(1, np.float32)))
    return (codes[0::2] << 4) | codes[1::2]


# ---------------------------------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tarball", default=".carry/anchors/bitsandbytes-95f9af3.tar.gz")
    ap.add_argument("--out", default="tests/fixtures/bnb")
    ap.add_argument("--table-out", default="src/fast_math_reciprocal_table.cpp")
    args = ap.parse_args()
    build_bitsandbytes(pathlib.Path(args.tarball), pathlib.Path("/tmp"))

    import torch
    from safetensors.torch import save_file
    import bitsandbytes
    import bitsandbytes.functional as F

    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name(0)
    rcp = make_rcp_on_gpu()
    table, rcp_info = measure_reciprocal(rcp)
    write_table_cpp(pathlib.Path(args.table_out), table, device)
    save_file({"rcp_bf16_mantissa": torch.from_numpy(table.view(np.int32).copy())}, str(out / "rcp_approx.safetensors"),
              metadata={"device": device, **{k: str(v) for k, v in rcp_info.items()}})

    torch_dtype = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}
    summary = {"device": device, "torch": torch.__version__, "bitsandbytes": bitsandbytes.__version__,
               "cuda": torch.version.cuda, **rcp_info, "configs": []}
    failures = []
    for di, dtype in enumerate(DTYPES):
        tensors = {}
        for bi, blocksize in enumerate(BLOCKSIZES):
            x = torch.from_numpy(make_input(blocksize, dtype, seed=1000 * di + bi)).to(torch_dtype[dtype])
            tensors[f"input.bs{blocksize}"] = x
            xc = x.cuda()
            x_np = x.float().numpy()
            for quant_type in ("nf4", "fp4"):
                name = f"{quant_type}.bs{blocksize}"
                packed, state = F.quantize_4bit(xc, blocksize=blocksize, quant_type=quant_type)
                packed_dq, state_dq = F.quantize_4bit(xc, blocksize=blocksize, quant_type=quant_type,
                                                      compress_statistics=True)
                if not torch.equal(packed, packed_dq):
                    failures.append(f"{dtype} {name}: packed codes differ with double quantization")
                absmax = state.absmax.float().cpu().numpy()
                tensors[f"{name}.packed"] = packed.flatten().cpu()
                tensors[f"{name}.absmax"] = state.absmax.cpu()
                tensors[f"{name}.dequant"] = F.dequantize_4bit(packed, state).flatten().cpu()
                tensors[f"{name}.dq.absmax_code"] = state_dq.absmax.cpu()
                tensors[f"{name}.dq.nested_absmax"] = state_dq.state2.absmax.cpu()
                tensors[f"{name}.dq.offset"] = state_dq.offset.reshape(1).float().cpu()
                tensors[f"{name}.dq.dequant"] = F.dequantize_4bit(packed_dq, state_dq).flatten().cpu()

                got = packed.flatten().cpu().numpy()
                with np.errstate(divide="ignore"):
                    ieee = np.float32(1.0) / absmax
                by_rcp = predicted_codes(x_np, absmax, rcp(absmax), quant_type, blocksize)
                by_ieee = predicted_codes(x_np, absmax, ieee, quant_type, blocksize)
                config = {"dtype": dtype, "quant_type": quant_type, "blocksize": blocksize, "numel": x.numel(),
                          "codes_differing_from_rcp_approx": nibbles(got, by_rcp),
                          "codes_differing_from_ieee": nibbles(got, by_ieee),
                          "absmax_bf16_representable": bool(np.all((absmax.view(np.uint32) & 0xFFFF) == 0)),
                          "offset_torch_cuda_mean": state_dq.offset.item(),
                          "offset_exact_mean_f32": float(np.float32(absmax.astype(np.float64).mean()))}
                summary["configs"].append(config)
                if config["codes_differing_from_rcp_approx"]:
                    failures.append(f"{dtype} {name}: {config['codes_differing_from_rcp_approx']} codes are not "
                                    "predicted by rcp.approx")
                log(json.dumps(config))
        path = out / f"bnb_{dtype}.safetensors"
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path),
                  metadata={"device": device, "torch": torch.__version__, "bitsandbytes": bitsandbytes.__version__})
        log(f"wrote {path} ({path.stat().st_size} bytes)")
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    log(f"wrote {out / 'summary.json'}")
    for f in failures:
        log(f"FAILED: {f}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
