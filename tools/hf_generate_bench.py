#!/usr/bin/env python3
"""The same-run anchor of `qlora generate --device cuda` at the 7B shape (chapter 5, "Generation
on the GPU"): transformers + bitsandbytes greedy decoding on the very folder our run used,
timed the way ours times itself. Runs on the GPU machine only (torch, transformers, sentencepiece
and a bitsandbytes built from ../shared/anchors); never part of the build.

    qlora bench train --shape 7b --write-hf /tmp/m7b      # the random model, BF16 folder
    qlora generate --device cuda --model /tmp/m7b --storage nf4-dq --tokenizer tokenizer.model \\
        --prompt "$P" --max-tokens 128 --temperature 0     # ours
    tools/hf_generate_bench.py --model /tmp/m7b --tokenizer tokenizer.model --prompt "$P" \\
        --new-tokens 128 --batch 1 --batch 16 --json hf.json

Settings as ours: NF4 + double quantization, compute dtype BF16, KV cache on (transformers'
default), greedy, every sequence the same prompt (BOS + SentencePiece ids), exactly
--new-tokens generated (min_new_tokens, so an end-of-sequence id does not stop it early).
Ours reports decoding tokens/s with the prefill excluded; here the same is
(batch · (N − 1)) / (t_N − t_1), t_k the time of a generate call with k new tokens (prefill plus
k − 1 decode steps), after one warm-up call. Each time is the best of --repeats calls.
"""
import argparse
import json
import time

import torch


def timed_generate(model, ids, new_tokens, repeats):
    best = float("inf")
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, use_cache=True, pad_token_id=0)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    if out.shape[1] != ids.shape[1] + new_tokens:
        raise SystemExit(f"generate returned {out.shape[1] - ids.shape[1]} new tokens, asked {new_tokens}")
    return best, out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="Hugging Face folder (qlora bench train --write-hf)")
    ap.add_argument("--tokenizer", required=True, help="the LLaMA-2 tokenizer.model our run used")
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batch", type=int, action="append", help="sequences per call (repeatable; default 1)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json")
    a = ap.parse_args()
    if a.new_tokens < 2:
        raise SystemExit("--new-tokens must be at least 2 (the decode rate is (N - 1) tokens over t_N - t_1)")

    import bitsandbytes as bnb
    import sentencepiece as spm
    import transformers
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    sp = spm.SentencePieceProcessor(model_file=a.tokenizer)
    prompt_ids = [sp.bos_id()] + sp.encode(a.prompt)
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.bfloat16)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(a.model, quantization_config=q, dtype=torch.bfloat16,
                                                 device_map={"": 0})
    model.eval()
    load_s = time.perf_counter() - t0
    print(f"loaded {a.model} in NF4+DQ in {load_s:.1f} s (transformers {transformers.__version__}, "
          f"bitsandbytes {bnb.__version__}, torch {torch.__version__})", flush=True)
    rows = []
    with torch.inference_mode():
        for batch in a.batch or [1]:
            ids = torch.tensor([prompt_ids] * batch, device="cuda")
            timed_generate(model, ids, 8, 1)  # warm-up: kernels loaded, caches allocated
            t1, _ = timed_generate(model, ids, 1, a.repeats)
            tn, out = timed_generate(model, ids, a.new_tokens, a.repeats)
            rate = batch * (a.new_tokens - 1) / (tn - t1)
            row = {"batch": batch, "prompt_tokens": len(prompt_ids), "new_tokens": a.new_tokens,
                   "t_1_s": t1, "t_n_s": tn, "decode_tokens_per_s": rate,
                   "first_ids": out[0, len(prompt_ids):len(prompt_ids) + 16].tolist()}
            rows.append(row)
            print(f"batch {batch}: {a.new_tokens} new tokens in {tn:.3f} s, one in {t1:.3f} s: "
                  f"{rate:.1f} tokens/s decoding; first ids {row['first_ids']}", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"benchmark": "hf_generate", "model": a.model, "load_s": load_s,
                       "device": torch.cuda.get_device_name(0), "transformers": transformers.__version__,
                       "bitsandbytes": bnb.__version__, "torch": torch.__version__, "runs": rows}, f, indent=1)


if __name__ == "__main__":
    main()
