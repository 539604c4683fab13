#!/usr/bin/env python3
"""The same-run anchor of `qlora bench train` (chapter 7, "Scaling up"): transformers + PEFT +
bitsandbytes QLoRA on the very model and tokens our bench used, timed and measured the way
our bench measures itself. Runs on the GPU machine only (torch, transformers, peft and a
bitsandbytes built from ../shared/anchors); never part of the build.

    qlora bench train --shape 7b --write-hf /tmp/m7b          # the random model, BF16 folder
    qlora bench train --model /tmp/m7b --tokens-out tok.json ...  # our run
    tools/hf_train_bench.py --model /tmp/m7b --tokens tok.json --json hf.json

Settings as ours: NF4 + double quantization (compute dtype BF16) or a BF16 base (--bf16),
LoRA r 64 / alpha 16 / dropout 0.05 on all seven projections with float32 A and B (PEFT's
default), gradient checkpointing, bitsandbytes' PagedAdamW32bit (lr 1e-4), global-norm
clipping at 1.0. Step s trains on the windows our bench wrote: inputs w[:, :T], targets
w[:, 1:], the mean cross-entropy over all B·T targets. Memory: device memory in use
(torch.cuda.mem_get_info: total − free, the CUDA context counted, as our bench reads
cudaMemGetInfo), sampled after forward, after backward and after the optimizer step; and
torch.cuda.max_memory_allocated beside it. Warm-up steps are excluded from the timing.
"""
import argparse
import json
import time

import torch
import torch.nn.functional as F


def used_gib():
    free, total = torch.cuda.mem_get_info()
    return (total - free) / 2**30


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="Hugging Face folder (qlora bench train --write-hf)")
    ap.add_argument("--tokens", required=True, help="token windows (qlora bench train --tokens-out)")
    ap.add_argument("--batch", type=int, default=4, help="sequences per step, as our run")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--alpha", type=float, default=16.0)
    ap.add_argument("--dropout", type=float, default=0.05)
    ap.add_argument("--bf16", action="store_true", help="BF16 base instead of NF4 + double quantization")
    ap.add_argument("--json")
    a = ap.parse_args()

    import bitsandbytes as bnb
    import peft
    import transformers
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    torch.cuda.init()
    torch.zeros(1, device="cuda")
    context = used_gib()
    t0 = time.perf_counter()
    if a.bf16:
        model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.bfloat16, device_map={"": 0})
    else:
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
        model = AutoModelForCausalLM.from_pretrained(a.model, quantization_config=q, dtype=torch.bfloat16,
                                                     device_map={"": 0})
    load_s = time.perf_counter() - t0
    if not a.bf16:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    else:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    cfg = LoraConfig(r=a.rank, lora_alpha=a.alpha, lora_dropout=a.dropout, bias="none", task_type="CAUSAL_LM",
                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    model = get_peft_model(model, cfg)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # PEFT's default: LoRA weights in float32
    model.config.use_cache = False
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = bnb.optim.PagedAdamW32bit(params, lr=1e-4, weight_decay=0.0)
    windows = json.load(open(a.tokens))
    after_load = used_gib()
    torch.cuda.reset_peak_memory_stats()
    steps, peak, timed = [], 0.0, 0.0
    for s, w in enumerate(windows):
        w = torch.tensor(w, device="cuda").view(a.batch, -1)  # B × (T+1)
        x, y = w[:, :-1], w[:, 1:]
        torch.cuda.synchronize()
        t = time.perf_counter()
        logits = model(input_ids=x).logits
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
        torch.cuda.synchronize()
        m_fwd = used_gib()
        loss.backward()
        torch.cuda.synchronize()
        m_bwd = used_gib()
        norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t
        peak = max(peak, m_fwd, m_bwd, used_gib())
        if s >= a.warmup:
            timed += dt
        steps.append({"step": s + 1, "loss": loss.item(), "grad_norm": norm.item(), "seconds": dt, "timed": s >= a.warmup})
        print(f"step {s + 1}/{len(windows)}: loss {loss.item():.4f}, grad norm {norm.item():.4f}, {dt:.3f} s, "
              f"{x.numel() / dt:.0f} tokens/s, {used_gib():.2f} GiB in use", flush=True)
    n_timed = len(windows) - a.warmup
    res = {
        "stack": f"transformers {transformers.__version__} + peft {peft.__version__} + bitsandbytes "
                 f"{bnb.__version__}, torch {torch.__version__}",
        "device": torch.cuda.get_device_name(),
        "base": "bf16" if a.bf16 else "nf4-dq",
        "batch": a.batch, "seq_len": int(x.shape[1]), "rank": a.rank, "alpha": a.alpha, "dropout": a.dropout,
        "optim": "bitsandbytes PagedAdamW32bit", "gradient_checkpointing": True,
        "warmup_steps": a.warmup, "timed_steps": n_timed,
        "load_seconds": load_s,
        "tokens_per_s": x.numel() * n_timed / timed,
        "memory_gib": {"context": context, "after_load": after_load, "peak_in_use": peak,
                       "max_memory_allocated": torch.cuda.max_memory_allocated() / 2**30,
                       "max_memory_reserved": torch.cuda.max_memory_reserved() / 2**30},
        "steps": steps,
    }
    print(json.dumps({k: v for k, v in res.items() if k != "steps"}, indent=1))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
