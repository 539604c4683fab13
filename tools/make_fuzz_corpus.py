#!/usr/bin/env python3
"""Seed corpus for tests/fuzz_readers.cpp: one small valid file per reader, prefixed by the
byte that picks the reader (0 safetensors with plain and 4-bit tensors, 1 llama2c checkpoint,
2 PEFT adapter folder, 3 llama2c tokenizer.bin after a vocabulary-size byte, 4 Hugging Face
LLaMA folder; a folder is its JSON and its safetensors, each half of the input). Each seed is a
file its reader accepts (CTest checks that through tests/fuzz_readers.cpp). libFuzzer mutates these from there.

    python3 tools/make_fuzz_corpus.py OUT_DIR [--tokenizer-bin PATH]

The tokenizer.bin seed is the start of the real file, found like the models are found
($QLORA_MODELS_DIR, then ../shared/models beside the checkout, then ./models); without
it that seed is left out.
"""
import argparse
import json
import math
import os
import struct
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# bitsandbytes' NF4 table (the float32 values chapter 2 derives); a 4-bit tensor's quant_map must equal it.
NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
       -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
       0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
       0.7229568362236328, 1.0]


def safetensors(tensors, metadata=None):
    """The safetensors layout: u64 header length, JSON header (padded to 8 bytes), data."""
    header, blob = {}, b""
    for name, (dtype, shape, data) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(blob), len(blob) + len(data)]}
        blob += data
    if metadata:
        header["__metadata__"] = metadata
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + blob


def floats(n):
    return struct.pack(f"<{n}f", *[0.1 * i for i in range(n)])


def folder(json_bytes, tensor_bytes):
    """The harness splits its input in two halves: pad the JSON to the tensors' length."""
    return json_bytes + b" " * (len(tensor_bytes) - len(json_bytes)) + tensor_bytes


def find_tokenizer_bin():
    dirs = [os.environ.get("QLORA_MODELS_DIR", ""), ROOT.parent / "shared" / "models", ROOT / "models"]
    for d in dirs:
        if d and (Path(d) / "tokenizer.bin").is_file():
            return Path(d) / "tokenizer.bin"
    return None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--tokenizer-bin", type=Path, default=find_tokenizer_bin())
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    seeds = {}

    seeds["safetensors"] = b"\x00" + safetensors(
        {"a": ("F32", [2, 3], floats(6)), "b": ("U8", [4], bytes(4)), "c": ("BF16", [2], b"\x80\x3f\x00\x40")},
        {"format": "pt"})
    state = json.dumps({"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [2, 64]}).encode()
    seeds["safetensors-4bit"] = b"\x00" + safetensors({
        "w": ("U8", [64, 1], bytes(range(64))),
        "w.absmax": ("F32", [2], floats(2)),
        "w.quant_map": ("F32", [16], struct.pack("<16f", *NF4)),
        "w.quant_state.bitsandbytes__nf4": ("U8", [len(state)], state)})

    dim, hidden, layers, heads, kv_heads, vocab, seq = 8, 16, 1, 2, 2, 4, 4
    head = dim // heads
    n = (vocab * dim + layers * (2 * dim + 2 * dim * dim + 2 * dim * kv_heads * head + 3 * hidden * dim)
         + dim + seq * head)
    seeds["llama2c"] = b"\x01" + struct.pack("<7i", dim, hidden, layers, heads, kv_heads, vocab, seq) + floats(n)

    config = json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4, "lora_dropout": 0.0,
                         "target_modules": ["q_proj"], "bias": "none", "task_type": "CAUSAL_LM",
                         "use_rslora": False}).encode()
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_{}.weight"
    seeds["peft"] = b"\x02" + folder(config, safetensors({key.format("A"): ("F32", [2, 8], floats(16)),
                                                          key.format("B"): ("F32", [8, 2], floats(16))}))

    if args.tokenizer_bin and args.tokenizer_bin.is_file():
        # llama2.c's layout: int32 max token length, then per token float32 score, int32 length, bytes.
        # Its first 64 tokens, exactly: the reader refuses bytes left over.
        raw, end = args.tokenizer_bin.read_bytes(), 4
        for _ in range(64):
            end += 8 + struct.unpack_from("<i", raw, end + 4)[0]
        seeds["tokenizer-bin"] = b"\x03" + bytes([63]) + raw[:end]

    config = json.dumps({"model_type": "llama", "hidden_size": dim, "intermediate_size": hidden, "num_hidden_layers": layers,
                         "num_attention_heads": heads, "num_key_value_heads": kv_heads, "vocab_size": vocab,
                         "max_position_embeddings": seq, "rms_norm_eps": 1e-5, "tie_word_embeddings": True}).encode()
    shapes = {"model.embed_tokens.weight": [vocab, dim], "model.norm.weight": [dim],
              "model.layers.0.input_layernorm.weight": [dim], "model.layers.0.post_attention_layernorm.weight": [dim]}
    for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
        shapes[f"model.layers.0.self_attn.{p}.weight"] = [dim, dim]
    for p, s in (("gate_proj", [hidden, dim]), ("up_proj", [hidden, dim]), ("down_proj", [dim, hidden])):
        shapes[f"model.layers.0.mlp.{p}.weight"] = s
    seeds["hf"] = b"\x04" + folder(config, safetensors(
        {k: ("F32", s, floats(math.prod(s))) for k, s in shapes.items()}))

    for name, data in seeds.items():
        (args.out / name).write_bytes(data)
    print(f"wrote {len(seeds)} seeds to {args.out}")


if __name__ == "__main__":
    main()
