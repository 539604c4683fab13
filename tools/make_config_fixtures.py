#!/usr/bin/env python3
"""Config-style fixtures for chapter 7's config test (tests/test_ch07_configs.cpp).

Builds one tiny seeded model per LLaMA-family config style with transformers' own classes
(LlamaForCausalLM, MistralForCausalLM), float32 on the CPU, saves it with save_pretrained and
records transformers' logits for a fixed sequence of T = 24 token ids. Not part of the build:
run it where torch, transformers 5.x and safetensors are installed, then commit the output:

    python3 tools/make_config_fixtures.py --out tests/fixtures/configs

Per style, in OUT/<style>/:
  config.json            as transformers 5.x wrote it (RoPE in "rope_parameters")
  config-4x.json         the same model in transformers 4.x's spelling ("rope_theta" at the
                         top level, "rope_scaling" null or a dict); the script checks that
                         transformers reads it to the same logits
  model.safetensors      float32 weights
  reference.safetensors  tokens I32 [T], positions I32 [P], logits F32 [P, vocab]
and OUT/index.json with the versions and the sensitivities below.

Sensitivity: a fixture proves something only if getting its config field wrong moves the
logits past the test's tolerance (1e-4, relative Frobenius). For every style the script
reruns transformers with rope_theta changed (to 10000, or to 500000 where 10000 is right),
for llama3 with the scaling removed, and for the windowed Mistral with a window shorter than
T, prints each relative error, and fails if a RoPE change moves the logits by less than 100x
the tolerance. Weights are drawn so that attention is sharp (q and k of standard deviation
about 2 per component), otherwise RoPE would barely matter in a tiny random model.
"""
import argparse
import json
import math
import os
import shutil
import tempfile

import safetensors.torch
import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

T = 24
TOLERANCE = 1e-4  # the C++ test's relative Frobenius tolerance
MIN_SENSITIVITY = 100 * TOLERANCE

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          # 8192 in LLaMA 3.1. With 64 and a head of 16 (wavelengths 6.3, 32.4, 167, 862, ...),
          # frequency 0 is kept, 1 is blended, 2..7 are slowed by 8: every branch is used.
          "original_max_position_embeddings": 64}

STYLES = {
    # LLaMA-2 7B: multi-head attention, theta 10000, untied classifier, eps 1e-5.
    "llama2": dict(hidden=32, heads=4, kv_heads=4, vocab=128, theta=10000.0),
    # LLaMA-3.1 8B: grouped-query attention, theta 500000 and the llama3 rescaling.
    "llama3": dict(hidden=32, heads=2, kv_heads=1, vocab=128, theta=500000.0, scaling=LLAMA3, max_pos=512),
    # LLaMA-3 8B: grouped-query attention 4:1, theta 500000, no rescaling.
    "gqa": dict(hidden=32, heads=4, kv_heads=1, vocab=128, theta=500000.0),
    # TinyLlama 1.1B: grouped-query attention 32:4, here 8:1, theta 10000.
    "tinyllama": dict(hidden=64, heads=8, kv_heads=1, vocab=128, theta=10000.0),
    # A larger vocabulary with a tied classifier; logits of the last 4 positions only (file size).
    "bigvocab": dict(hidden=16, heads=2, kv_heads=2, vocab=4096, theta=10000.0, tied=True, intermediate=32,
                     positions=list(range(T - 4, T))),
    # Mistral 7B v0.2 and later: no sliding window, theta 1e6.
    "mistral": dict(mistral=True, hidden=32, heads=4, kv_heads=2, vocab=128, theta=1e6, window=None),
    # Mistral 7B v0.1: a sliding window (4096 there), here 32, longer than the test sequence.
    "mistral_window": dict(mistral=True, hidden=32, heads=4, kv_heads=2, vocab=128, theta=10000.0, window=32),
}


def make_config(spec, theta=None, scaling="spec", window="spec"):
    """The style's transformers config; theta, scaling and window override the style's own."""
    rope = {"rope_type": "default"}
    scaling = spec.get("scaling") if scaling == "spec" else scaling
    if scaling:
        rope = dict(scaling)
    rope["rope_theta"] = spec["theta"] if theta is None else theta
    kw = dict(vocab_size=spec["vocab"], hidden_size=spec["hidden"], intermediate_size=spec.get("intermediate", 64),
              num_hidden_layers=2, num_attention_heads=spec["heads"], num_key_value_heads=spec["kv_heads"],
              max_position_embeddings=spec.get("max_pos", 128), rms_norm_eps=1e-5,
              tie_word_embeddings=spec.get("tied", False), rope_parameters=rope)
    if spec.get("mistral"):
        kw["sliding_window"] = spec["window"] if window == "spec" else window
        return MistralConfig(**kw)
    return LlamaConfig(**kw)


def model_class(spec):
    return MistralForCausalLM if spec.get("mistral") else LlamaForCausalLM


def randomize(model, seed):
    """Seeded weights: norms near 1, unit embeddings, projections of variance gain²/fan_in."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if p.dim() == 1:
                p.copy_(1 + 0.1 * noise)
            elif name.endswith("embed_tokens.weight"):
                p.copy_(noise)
            else:
                gain = 2.0 if name.endswith(("q_proj.weight", "k_proj.weight")) else 1.0
                p.copy_(gain * noise / math.sqrt(p.shape[1]))


def logits_of(model, ids):
    with torch.no_grad():
        return model(input_ids=ids[None]).logits[0].float()


def rel_error(a, ref):
    return (torch.linalg.norm((a - ref).double()) / torch.linalg.norm(ref.double())).item()


def save(model, folder):
    try:
        model.save_pretrained(folder, safe_serialization=True)
    except TypeError:  # the argument is gone where safetensors is the only format
        model.save_pretrained(folder)
    for extra in ("generation_config.json",):
        path = os.path.join(folder, extra)
        if os.path.exists(path):
            os.remove(path)


def to_4x(cfg5):
    """transformers 5.x's config.json dict in 4.x's spelling (same model)."""
    cfg = dict(cfg5)
    rope = dict(cfg.pop("rope_parameters"))
    if cfg.get("rope_scaling") not in (None, cfg5["rope_parameters"]):
        raise SystemExit("config.json has a rope_scaling that differs from rope_parameters")
    theta = rope.pop("rope_theta")
    if cfg.get("rope_theta", theta) != theta:
        raise SystemExit("config.json has two different rope_theta values")
    cfg["rope_theta"] = theta
    if rope.get("rope_type", "default") == "default":
        if set(rope) - {"rope_type"}:
            raise SystemExit(f"default RoPE with extra fields {rope}")
        cfg["rope_scaling"] = None
    else:
        cfg["rope_scaling"] = rope
    return cfg


def load_logits(cls, folder, ids):
    return logits_of(cls.from_pretrained(folder).float().eval(), ids)


def make_style(index, name, spec, out):
    folder = os.path.join(out, name)
    shutil.rmtree(folder, ignore_errors=True)
    cls = model_class(spec)
    torch.manual_seed(index)
    model = cls(make_config(spec)).float().eval()
    randomize(model, 1000 + index)
    ids = torch.randint(0, spec["vocab"], (T,), generator=torch.Generator().manual_seed(2000 + index))
    save(model, folder)

    with open(os.path.join(folder, "config.json")) as f:
        cfg5 = json.load(f)
    if "rope_parameters" not in cfg5:
        raise SystemExit(f"{name}: transformers {transformers.__version__} did not write rope_parameters")
    with open(os.path.join(folder, "config-4x.json"), "w") as f:
        json.dump(to_4x(cfg5), f, indent=2, sort_keys=True)
        f.write("\n")

    # transformers' logits from the saved folder, and the same from the 4.x spelling.
    ref = load_logits(cls, folder, ids)
    if rel_error(logits_of(model, ids), ref) > 1e-6:
        raise SystemExit(f"{name}: the saved folder does not reproduce the model")
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(os.path.join(folder, "model.safetensors"), tmp)
        shutil.copy(os.path.join(folder, "config-4x.json"), os.path.join(tmp, "config.json"))
        err_4x = rel_error(load_logits(cls, tmp, ids), ref)
    if err_4x > 1e-6:
        raise SystemExit(f"{name}: transformers reads config-4x.json to different logits ({err_4x:.2e})")

    positions = spec.get("positions", list(range(T)))
    safetensors.torch.save_file({"tokens": ids.to(torch.int32),
                                 "positions": torch.tensor(positions, dtype=torch.int32),
                                 "logits": ref[positions].contiguous()},
                                os.path.join(folder, "reference.safetensors"))

    # Sensitivity: the same weights under a wrong config.
    def rerun(**override):
        wrong = cls(make_config(spec, **override)).float().eval()
        wrong.load_state_dict(model.state_dict())
        return rel_error(logits_of(wrong, ids), ref)

    other_theta = 500000.0 if spec["theta"] == 10000.0 else 10000.0
    checks = {f"rope_theta {other_theta:g}": (rerun(theta=other_theta), True)}
    if spec.get("scaling"):
        checks["rope scaling removed"] = (rerun(scaling=None), True)
    if spec.get("window"):
        checks["sliding_window 8 (< T)"] = (rerun(window=8), False)  # why the model refuses T > window
    for label, (err, required) in checks.items():
        print(f"{name:15s} {label:24s} relative error {err:.3e}")
        if required and err < MIN_SENSITIVITY:
            raise SystemExit(f"{name}: {label} moves the logits by only {err:.2e}; the fixture would not catch it")
    err_same = rerun()
    if err_same > 1e-6:
        raise SystemExit(f"{name}: rebuilding the model does not reproduce it ({err_same:.2e})")
    return {"model_type": cfg5["model_type"], "T": T, "positions": positions,
            "sensitivity": {label: err for label, (err, _) in checks.items()}, "config_4x_error": err_4x}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="tests/fixtures/configs")
    args = ap.parse_args()
    if int(transformers.__version__.split(".")[0]) < 5:
        raise SystemExit(f"needs transformers 5.x (it writes rope_parameters), found {transformers.__version__}")
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    os.makedirs(args.out, exist_ok=True)
    styles = {name: make_style(i, name, spec, args.out) for i, (name, spec) in enumerate(STYLES.items())}
    index = {"generator": "tools/make_config_fixtures.py", "torch": torch.__version__,
             "transformers": transformers.__version__, "device": "cpu", "dtype": "float32",
             "tolerance": TOLERANCE, "styles": styles}
    with open(os.path.join(args.out, "index.json"), "w") as f:
        json.dump(index, f, indent=1)
        f.write("\n")
    total = sum(os.path.getsize(os.path.join(d, n)) for d, _, files in os.walk(args.out) for n in files)
    print(f"wrote {args.out} ({total / 1e6:.2f} MB)")
    if total > 1.5e6:
        raise SystemExit("fixtures larger than 1.5 MB")


if __name__ == "__main__":
    main()
