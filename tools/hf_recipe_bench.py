#!/usr/bin/env python3
"""The speed reference for chapter 7: Hugging Face transformers + PEFT training the same
LoRA recipe on the same GPU, timed the way `qlora finetune` times itself.

Usage (on the GPU machine; torch, transformers and peft installed — never part of the build):
    tools/hf_recipe_bench.py --base kjv15M-hf-folder [--steps 60] [--json out.json]

Recipe as scripts/gpu_recipe.sh: batch 32 × seq_len 256 random windows of
tinyshakespeare-sized token ids, LoRA r 16, alpha 32, dropout 0.05 on all seven projections,
AdamW lr 1e-3, clip 0.3; base weights frozen in BF16 (bitsandbytes is not installed on the
lent machine, so the 4-bit base of the original stack cannot be timed here: this is
PEFT's BF16-LoRA path, the same stack minus the 4-bit dequantization). torch.autocast is
not used: the model is loaded in bfloat16 and the LoRA weights are float32, as PEFT does
by default. Prints tokens/s (median over steps after 10 warm-up steps) and peak memory
(torch.cuda.max_memory_allocated and max_memory_reserved).
"""
import argparse
import json
import statistics
import time

import torch
import transformers
import peft
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--json")
    a = ap.parse_args()
    torch.manual_seed(0)
    dev = "cuda"
    model = AutoModelForCausalLM.from_pretrained(a.base, dtype=torch.bfloat16).to(dev)
    cfg = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, bias="none", task_type="CAUSAL_LM",
                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    model = get_peft_model(model, cfg)
    for n, p in model.named_parameters():
        if p.requires_grad:
            p.data = p.data.float()  # PEFT's LoRA weights in float32, as in QLoRA's recipe
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    vocab = model.config.vocab_size
    times = []
    torch.cuda.reset_peak_memory_stats()
    for step in range(a.steps):
        x = torch.randint(0, vocab, (a.batch, a.seq_len + 1), device=dev)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = model(input_ids=x[:, :-1], labels=x[:, :-1])
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.3)
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    steady = times[10:]
    tps = a.batch * a.seq_len / statistics.median(steady)
    res = {
        "stack": f"transformers {transformers.__version__} + peft {peft.__version__}, torch {torch.__version__}",
        "base": "bf16 (no bitsandbytes on this machine)",
        "device": torch.cuda.get_device_name(),
        "batch": a.batch, "seq_len": a.seq_len, "steps_timed": len(steady),
        "median_step_ms": 1e3 * statistics.median(steady),
        "tokens_per_s": tps,
        "peak_allocated_mib": torch.cuda.max_memory_allocated() / 2**20,
        "peak_reserved_mib": torch.cuda.max_memory_reserved() / 2**20,
    }
    print(json.dumps(res, indent=1))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
