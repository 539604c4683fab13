#!/usr/bin/env python3
"""Reference folders saved by transformers + bitsandbytes in 4 bits (chapter 7, "Folders saved in 4 bits").

Not part of the build: run it from the repository root on a machine with a CUDA GPU, torch,
transformers, safetensors, sentencepiece and bitsandbytes importable (bitsandbytes quantizes
on the GPU only). Two jobs, either or both:

(a) --fixtures DIR (default tests/fixtures/bnb_models): tiny seeded random LLaMAs (dim 64,
    2 layers, 4 query heads sharing 2 kv heads, a 176-wide MLP, vocab 512, tied classifier),
    loaded by transformers with BitsAndBytesConfig(load_in_4bit=True, ...) and written with
    save_pretrained into DIR/<name>/, one per case:
        nf4-dq   bnb_4bit_quant_type "nf4", bnb_4bit_use_double_quant True
        fp4      bnb_4bit_quant_type "fp4", bnb_4bit_use_double_quant False
    (bitsandbytes' blocksize 64 in both). Every weight is first rounded to a BF16 value and the
    model is loaded in float32 with bnb_4bit_compute_dtype float32, so that nothing but float32
    summation order separates transformers + bitsandbytes from our CPU model, which keeps
    embeddings and norms in BF16 and multiplies the dequantized weights in float32. The folder
    is loaded back from disk and its logits for fixed tokens are written to
    DIR/<name>.logits.safetensors (tokens I32 [T], logits F32 [T, vocab]); DIR/index.json lists
    the cases. tests/test_ch07_bnb_folders.cpp compares.

(b) --kjv15m PATH --kjv-out DIR: the BF16 folder kjv15M-hf loaded with NF4 + double
    quantization (compute dtype float32), saved to DIR (not committed) with tokenizer.model
    copied next to it, and the held-out loss on --data computed exactly as
    `qlora eval --model DIR --held-out` computes it: BOS (id 1) + SentencePiece ids of the
    whole file, the last floor(0.1 n) tokens held out, consecutive windows of --seq-len
    inputs with their next tokens, --batch windows per forward, the mean of the window means.
    Prints JSON with that loss and, for reference, the loss of the unquantized folder.

    python3 tools/make_bnb_fixtures.py \\
        --kjv15m .carry/shared/models/kjv15M-hf --kjv-out /tmp/kjv15M-bnb-nf4-dq \\
        --tokenizer .carry/shared/models/tokenizer.model --data .carry/shared/data/tinyshakespeare.txt
"""
import argparse
import datetime
import json
import os
import shutil
import tempfile

import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import save_file
from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

import bitsandbytes

SEED = 2026
MAX_FOLDER_BYTES = 300_000
CASES = [
    {"name": "nf4-dq", "quant_type": "nf4", "double_quant": True},
    {"name": "fp4", "quant_type": "fp4", "double_quant": False},
]


def exact_float32():
    # TF32 would round the matmul operands to 10-bit mantissas: not a float32 reference.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")


def bnb_config(quant_type, double_quant):
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                              bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=torch.float32)


def load_4bit(folder, quant_type, double_quant):
    return LlamaForCausalLM.from_pretrained(folder, quantization_config=bnb_config(quant_type, double_quant),
                                            dtype=torch.float32, device_map={"": 0},
                                            attn_implementation="eager").eval()


def tiny_model():
    cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      rms_norm_eps=1e-5, tie_word_embeddings=True, hidden_act="silu",
                      attention_bias=False, mlp_bias=False, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(cfg).float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name == "model.embed_tokens.weight":
                p.copy_(torch.randn_like(p))
            else:  # variance 1/in keeps the activations O(1), so the logits are not trivial
                p.copy_(torch.randn_like(p) / p.shape[1] ** 0.5)
            p.copy_(p.to(torch.bfloat16).to(torch.float32))
    return model


def tokens_for(vocab, T=24):
    return [1] + [(7 * i * i + 3 * i + 11) % (vocab - 3) + 3 for i in range(T - 1)]


def folder_bytes(folder):
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))


def make_fixtures(out_dir):
    exact_float32()
    os.makedirs(out_dir, exist_ok=True)
    index = {"made_by": "tools/make_bnb_fixtures.py", "date": datetime.date.today().isoformat(),
             "torch": torch.__version__, "transformers": transformers.__version__,
             "bitsandbytes": bitsandbytes.__version__, "gpu": torch.cuda.get_device_name(0), "cases": []}
    with tempfile.TemporaryDirectory() as tmp:
        tiny_model().save_pretrained(tmp)  # float32 values that are all BF16 numbers
        for case in CASES:
            folder = os.path.join(out_dir, case["name"])
            shutil.rmtree(folder, ignore_errors=True)
            load_4bit(tmp, case["quant_type"], case["double_quant"]).save_pretrained(folder)
            size = folder_bytes(folder)
            assert size < MAX_FOLDER_BYTES, f"{folder}: {size} bytes"
            # The logits of the folder as saved: what our loader reads is what computed them.
            model = load_4bit(folder, case["quant_type"], case["double_quant"])
            tokens = tokens_for(model.config.vocab_size)
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([tokens], device="cuda:0")).logits[0].float().cpu()
            logits_file = case["name"] + ".logits.safetensors"
            save_file({"tokens": torch.tensor(tokens, dtype=torch.int32), "logits": logits.contiguous()},
                      os.path.join(out_dir, logits_file))
            index["cases"].append({**case, "folder": case["name"], "blocksize": 64, "logits": logits_file,
                                   "folder_bytes": size, "max_abs_logit": logits.abs().max().item()})
            print(f"{folder}: {size} bytes, max |logit| {logits.abs().max().item():.4f}")
    with open(os.path.join(out_dir, "index.json"), "w") as f:
        json.dump(index, f, indent=2)
        f.write("\n")


def held_out_ids(tokenizer, data):
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=tokenizer)
    with open(data, "rb") as f:
        text = f.read().decode("utf-8")
    ids = [1] + sp.encode(text)  # load_finetune_data: BOS first, then the whole file
    n_val = int(len(ids) * 0.1)  # static_cast<size_t>(double(n) * 0.1)
    return ids[len(ids) - n_val:]


def held_out_loss(model, ids, seq_len, batch):
    windows = (len(ids) - 1) // seq_len  # validation_loss: only full windows
    total = 0.0
    for w0 in range(0, windows, batch):
        nb = min(batch, windows - w0)
        x = torch.tensor([ids[(w0 + b) * seq_len:(w0 + b + 1) * seq_len] for b in range(nb)], device="cuda:0")
        y = torch.tensor([ids[(w0 + b) * seq_len + 1:(w0 + b + 1) * seq_len + 1] for b in range(nb)],
                         device="cuda:0")
        with torch.no_grad():
            logits = model(input_ids=x).logits.float()
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)).item() * nb
    return total / windows, windows


def kjv(args):
    exact_float32()
    ids = held_out_ids(args.tokenizer, args.data)
    shutil.rmtree(args.kjv_out, ignore_errors=True)
    load_4bit(args.kjv15m, "nf4", True).save_pretrained(args.kjv_out)
    shutil.copy(args.tokenizer, os.path.join(args.kjv_out, "tokenizer.model"))
    quantized = load_4bit(args.kjv_out, "nf4", True)
    loss, windows = held_out_loss(quantized, ids, args.seq_len, args.batch)
    base = LlamaForCausalLM.from_pretrained(args.kjv15m, dtype=torch.float32, device_map={"": 0},
                                            attn_implementation="eager").eval()
    base_loss, _ = held_out_loss(base, ids, args.seq_len, args.batch)
    print(json.dumps({"folder": args.kjv_out, "storage": "nf4-dq", "data": args.data, "held_out_tokens": len(ids),
                      "seq_len": args.seq_len, "batch": args.batch, "windows": windows,
                      "loss_transformers_bnb": loss, "loss_unquantized_float32": base_loss,
                      "compare_with": f"qlora eval --model {args.kjv_out} --held-out --seq-len {args.seq_len} "
                                      f"--batch {args.batch} --data {args.data}"}, indent=2))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fixtures", default="tests/fixtures/bnb_models", help="output folder of (a); '' skips (a)")
    ap.add_argument("--kjv15m", help="the BF16 kjv15M-hf folder; runs (b)")
    ap.add_argument("--kjv-out", help="where (b) saves the 4-bit kjv15M folder")
    ap.add_argument("--tokenizer", default="../shared/models/tokenizer.model")
    ap.add_argument("--data", default="../shared/data/tinyshakespeare.txt")
    ap.add_argument("--seq-len", type=int, default=64, help="qlora eval's default")
    ap.add_argument("--batch", type=int, default=8, help="qlora eval's default")
    args = ap.parse_args()
    if args.fixtures:
        make_fixtures(args.fixtures)
    if args.kjv15m:
        if not args.kjv_out:
            ap.error("--kjv15m needs --kjv-out")
        kjv(args)


if __name__ == "__main__":
    main()
