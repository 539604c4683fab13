#!/usr/bin/env python3
"""Chapter 7's reference recipe run by transformers + PEFT + bitsandbytes: the "HF stack"
column of the storage table and the speed reference, from a run of this script.

Runs on the GPU machine only (torch, transformers, peft, sentencepiece, and a bitsandbytes
built from ../shared/anchors by scripts/build_bnb.sh); never part of the build.

    tools/hf_recipe.py --model kjv15M-hf-folder --data tinyshakespeare.txt \
        --storage nf4-dq [--optim paged_adamw_8bit] [--seed 1337] --json out.json

The recipe is scripts/gpu_recipe.sh's, step for step:
  - data: the text encoded by the folder's tokenizer.model with SentencePiece, BOS first, the
    last 10 % held out (as `qlora finetune` splits it);
  - batches: the same windows as `qlora finetune --seed S`: its data generator is a
    std::mt19937_64 seeded with S, and each window starts at floor(u · (n − T)) with
    u = (draw >> 11) · 2⁻⁵³; the generator is re-implemented below so both stacks read
    identical tokens (the dropout masks differ: PyTorch draws its own);
  - model: the folder loaded in BF16, or quantized by bitsandbytes (NF4/FP4, double
    quantization or not, compute dtype BF16); LoRA r 16, alpha 32, dropout 0.05 on all
    seven projections, A and B in float32 (PEFT's default);
  - training: 400 steps of batch 32 × 256, loss = mean cross-entropy over all B·T targets
    (inputs w[:, :T], targets w[:, 1:]), torch AdamW (or bitsandbytes' PagedAdamW8bit)
    lr 1e-3, no weight decay, linear warmup over 20 steps as `qlora finetune` counts them
    (step s < 20 uses lr·s/20, s from 1), global-norm clipping at 0.3;
  - validation: every consecutive 256-token window of the held-out tokens, the mean of the
    window means, before training and every 50 steps.
Timing: each step between two cuda synchronizations; tokens/s over the steps after the
first 10. Memory: device memory in use (torch.cuda.mem_get_info: total − free, the CUDA
context counted, as `qlora finetune` reads cudaMemGetInfo) after every step, and
torch.cuda.max_memory_allocated beside it.
"""
import argparse
import json
import math
import os
import pathlib
import statistics
import sys
import time

import torch
import torch.nn.functional as F

STORAGES = ("bf16", "nf4", "nf4-dq", "fp4", "fp4-dq")
MASK64 = (1 << 64) - 1


class MT19937_64:
    """std::mt19937_64 (the C++ standard's parameters), for the same windows as ours."""

    def __init__(self, seed):
        self.mt = [0] * 312
        self.mt[0] = seed & MASK64
        for i in range(1, 312):
            self.mt[i] = (6364136223846793005 * (self.mt[i - 1] ^ (self.mt[i - 1] >> 62)) + i) & MASK64
        self.i = 312

    def __call__(self):
        if self.i >= 312:
            for k in range(312):
                y = (self.mt[k] & 0xFFFFFFFF80000000) | (self.mt[(k + 1) % 312] & 0x7FFFFFFF)
                v = self.mt[(k + 156) % 312] ^ (y >> 1)
                if y & 1:
                    v ^= 0xB5026F5AA96619E9
                self.mt[k] = v
            self.i = 0
        x = self.mt[self.i]
        self.i += 1
        x ^= (x >> 29) & 0x5555555555555555
        x ^= (x << 17) & 0x71D67FFFEDA60000
        x ^= (x << 37) & 0xFFF7EEE000000000
        x ^= x >> 43
        return x & MASK64


def used_gib():
    free, total = torch.cuda.mem_get_info()
    return (total - free) / 2**30


def encode(model_dir, data_file):
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(pathlib.Path(model_dir) / "tokenizer.model"))
    ids = [sp.bos_id()] + sp.encode(pathlib.Path(data_file).read_text(encoding="utf-8"))
    n_val = int(len(ids) * 0.1)
    return ids[: len(ids) - n_val], ids[len(ids) - n_val:]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="the kjv15M Hugging Face folder")
    ap.add_argument("--data", required=True, help="tinyshakespeare.txt")
    ap.add_argument("--storage", choices=STORAGES, required=True)
    ap.add_argument("--optim", choices=("adamw_32bit", "paged_adamw_8bit"), default="adamw_32bit")
    ap.add_argument("--seed", type=int, default=1337, help="as qlora finetune --seed: picks the windows")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--json", required=True)
    a = ap.parse_args()

    import peft
    import transformers
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    torch.manual_seed(a.seed)
    torch.cuda.init()
    torch.zeros(1, device="cuda")
    train, val = encode(a.model, a.data)
    T, B = a.seq_len, a.batch
    print(f"{len(train)} train / {len(val)} validation tokens", flush=True)

    bnb_version = None
    if a.storage == "bf16":
        model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.bfloat16, device_map={"": 0})
    else:
        import bitsandbytes as bnb
        bnb_version = bnb.__version__
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=a.storage.split("-")[0],
                               bnb_4bit_use_double_quant=a.storage.endswith("-dq"),
                               bnb_4bit_compute_dtype=torch.bfloat16)
        model = AutoModelForCausalLM.from_pretrained(a.model, quantization_config=q, dtype=torch.bfloat16,
                                                     device_map={"": 0})
    cfg = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, bias="none", task_type="CAUSAL_LM",
                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    model = get_peft_model(model, cfg)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # PEFT's default: LoRA weights in float32
    model.config.use_cache = False
    params = [p for p in model.parameters() if p.requires_grad]
    if a.optim == "paged_adamw_8bit":
        import bitsandbytes as bnb
        bnb_version = bnb.__version__
        opt = bnb.optim.PagedAdamW8bit(params, lr=1e-3, weight_decay=0.0)
    else:
        opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)

    val_t = torch.tensor(val, device="cuda")

    @torch.no_grad()
    def validation_loss():
        model.eval()
        windows = (len(val) - 1) // T
        total = 0.0
        for w0 in range(0, windows, B):
            nb = min(B, windows - w0)
            w = torch.stack([val_t[(w0 + b) * T: (w0 + b) * T + T + 1] for b in range(nb)])
            logits = model(input_ids=w[:, :T]).logits
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1))
            total += loss.item() * nb
        model.train()
        return total / windows

    rng = MT19937_64(a.seed)
    max_start = len(train) - T - 1
    train_t = torch.tensor(train, device="cuda")
    val_losses = {0: validation_loss()}
    print(f"before: validation loss {val_losses[0]:.4f}", flush=True)
    model.train()
    torch.cuda.reset_peak_memory_stats()
    steps, peak = [], used_gib()
    for s in range(1, a.steps + 1):
        starts = [int(((rng() >> 11) * 2.0**-53) * (max_start + 1.0)) for _ in range(B)]
        w = torch.stack([train_t[o: o + T + 1] for o in starts])
        lr = 1e-3 * s / 20 if s < 20 else 1e-3
        for g in opt.param_groups:
            g["lr"] = lr
        torch.cuda.synchronize()
        t = time.perf_counter()
        logits = model(input_ids=w[:, :T]).logits
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1))
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, 0.3)
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t
        peak = max(peak, used_gib())
        rec = {"step": s, "loss": loss.item(), "grad_norm": norm.item(), "lr": lr, "seconds": dt}
        if a.eval_every > 0 and (s % a.eval_every == 0 or s == a.steps):
            rec["val_loss"] = val_losses[s] = validation_loss()
            print(f"step {s}: loss {rec['loss']:.4f}, validation loss {rec['val_loss']:.4f}, "
                  f"{B * T / dt:.0f} tokens/s", flush=True)
        steps.append(rec)
    timed = [r["seconds"] for r in steps[10:]]
    res = {
        "stack": f"transformers {transformers.__version__} + peft {peft.__version__}"
                 + (f" + bitsandbytes {bnb_version}" if bnb_version else "") + f", torch {torch.__version__}",
        "device": torch.cuda.get_device_name(),
        "storage": a.storage, "optim": a.optim, "seed": a.seed,
        "batch": B, "seq_len": T, "steps": a.steps,
        "train_tokens": len(train), "val_tokens": len(val),
        "val_loss_before": val_losses[0], "val_loss_after": val_losses[a.steps],
        "val_losses": {str(k): v for k, v in val_losses.items()},
        "tokens_per_s": B * T * len(timed) / sum(timed),
        "median_step_ms": 1e3 * statistics.median(timed),
        "memory_gib": {"peak_in_use": peak, "max_memory_allocated": torch.cuda.max_memory_allocated() / 2**30},
        "log": steps,
    }
    print(json.dumps({k: v for k, v in res.items() if k != "log"}, indent=1))
    tmp = a.json + ".tmp"
    with open(tmp, "w") as f:
        json.dump(res, f, indent=1)
    os.replace(tmp, a.json)
    return 0 if all(math.isfinite(r["loss"]) for r in steps) else 1


if __name__ == "__main__":
    sys.exit(main())
