#!/usr/bin/env python3
"""Do our PEFT adapters mean in Hugging Face what they mean in qlora.cpp? (chapter 7)

Loads the base model with transformers in float32, puts the adapter folder that
`qlora finetune` wrote on top with PEFT (`PeftModel.from_pretrained`), runs the tokens
that `qlora eval --dump-logits` saved, and compares the logits with the ones qlora.cpp
computed for the same base + adapter. Optionally also loads the folder `qlora merge`
wrote (base with the adapter folded in, BF16) and compares its logits too.

Needs torch, transformers (5.x) and peft (0.21); no bitsandbytes (both sides run the
base in float32). Runs on a GPU if there is one, else on the CPU. Usage, from the
repository root, with the qlora binary in build/ (kjv15M-hf is the BF16 Hugging Face
export of kjv15M; the base must be the SAME folder on both sides):

    build/qlora finetune --out out/ft                      # writes out/ft/adapter/
    build/qlora eval --model kjv15M-hf --storage f32 --adapter out/ft/adapter \\
        --held-out --windows 1 --seq-len 256 --dump-logits out/ft/logits.safetensors
    build/qlora merge --model kjv15M-hf --adapter out/ft/adapter --out out/ft/merged   # optional
    python3 tools/peft_check.py --base ../shared/models/kjv15M-hf --adapter out/ft/adapter \\
        --logits out/ft/logits.safetensors [--merged out/ft/merged]

Exit status 0 iff every comparison is within tolerance and PEFT loaded every adapter
tensor (no missing or unexpected keys); 1 otherwise.

Tolerances (relative Frobenius norm of the logit difference):
  - adapter, 1e-4: both sides compute in float32 with the same weights (the BF16 base
    read into float32, the adapter's float32 tensors); they differ only in summation
    order (OpenBLAS vs torch's kernels) and in how RoPE angles are rounded, a few
    float32 ulps (~1e-7) per operation, which through 6 layers stay orders of magnitude
    below 1e-4. A wrong q/k row order or a missed module moves logits by O(1e-2 .. 1).
  - merged (BF16), 1e-2: every merged weight is rounded to BF16 (≤ 2^-9 relative, ~1e-3
    rms), which moves the logits by ~1e-3 relative: qlora.cpp itself measures 5.3e-3 on
    the tiny model of tests/test_ch07_merge.cpp and 7.9e-4 on kjv15M-hf + the CPU demo
    adapter (`qlora eval --dump-logits` of the merged folder vs base + adapter).
"""
import argparse
import sys
import warnings
from pathlib import Path

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

ADAPTER_TOL = 1e-4
MERGED_TOL = 1e-2


def load_base(folder, device):
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    return model.to(device).eval()


def check_adapter_loaded(peft_model, adapter_dir, device):
    """Every tensor of adapter_model.safetensors must sit, unchanged, in a LoRA parameter of the
    model, and every LoRA parameter must come from the file: missing/unexpected keys fail."""
    file = load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))
    params = {n: p for n, p in peft_model.named_parameters() if ".lora_A." in n or ".lora_B." in n}
    problems = []
    used = set()
    for key, t in file.items():
        # PEFT stores "...q_proj.lora_A.weight"; in the model it is "...q_proj.lora_A.default.weight".
        name = key.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight", ".lora_B.default.weight")
        if name not in params:
            problems.append(f"unexpected key (no such LoRA parameter in the model): {key}")
            continue
        used.add(name)
        if tuple(params[name].shape) != tuple(t.shape):
            problems.append(f"{key}: shape {tuple(t.shape)} in the file, {tuple(params[name].shape)} in the model")
        elif not torch.equal(params[name].detach(), t.to(device=device, dtype=params[name].dtype)):
            problems.append(f"{key}: the model's values differ from the file's")
    problems += [f"missing key (LoRA parameter not in the file): {n}" for n in sorted(set(params) - used)]
    return problems, len(file)


def compare(name, logits, ref, tol):
    diff = (logits - ref).double()
    max_abs = diff.abs().max().item()
    rel = (diff.norm() / ref.double().norm()).item()
    ok = rel <= tol
    print(f"{name}: max |Δlogit| {max_abs:.3e}, relative Frobenius {rel:.3e} (tolerance {tol:.0e}) "
          f"{'OK' if ok else 'FAIL'}")
    return ok


def main():
    p = argparse.ArgumentParser(description="Compare qlora.cpp's logits with transformers + PEFT's.")
    p.add_argument("--base", required=True, help="Hugging Face LLaMA folder (the base qlora eval used)")
    p.add_argument("--adapter", required=True, help="PEFT adapter folder written by qlora finetune")
    p.add_argument("--logits", required=True, help="safetensors from qlora eval --dump-logits (--storage f32)")
    p.add_argument("--merged", help="folder written by qlora merge from the same base and adapter")
    a = p.parse_args()

    torch.backends.cuda.matmul.allow_tf32 = False  # float32 means float32 (no TF32 tensor cores)
    torch.backends.cudnn.allow_tf32 = False
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dump = load_file(a.logits)
    tokens = dump["tokens"].to(torch.long).unsqueeze(0).to(device)
    ref = dump["logits"].to(device)
    print(f"{a.logits}: {tokens.shape[1]} tokens, vocab {ref.shape[1]}; running on {device}, "
          f"torch {torch.__version__}")

    base = load_base(a.base, device)
    with warnings.catch_warnings(record=True) as caught:  # PEFT warns about missing/unexpected keys
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(base, a.adapter).to(device).eval()
    problems = [f"PEFT warned: {w.message}" for w in caught
                if "missing" in str(w.message).lower() or "unexpected" in str(w.message).lower()]
    more, n_tensors = check_adapter_loaded(model, a.adapter, device)
    problems += more
    for msg in problems:
        print("ERROR:", msg, file=sys.stderr)
    print(f"PEFT loaded {n_tensors} adapter tensors" + (f", {len(problems)} problems" if problems else ", all in place"))

    with torch.no_grad():
        ok = compare("base + adapter (PEFT) vs qlora.cpp", model(tokens).logits[0].float(), ref, ADAPTER_TOL)
        if a.merged:
            del model
            merged = load_base(a.merged, device)
            ok = compare("merged BF16 (qlora merge) vs qlora.cpp", merged(tokens).logits[0].float(), ref,
                         MERGED_TOL) and ok
    sys.exit(0 if ok and not problems else 1)


if __name__ == "__main__":
    main()
