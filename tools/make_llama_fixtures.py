#!/usr/bin/env python3
"""Reference fixtures for chapter 7's model test, from an independent implementation.

Runs Hugging Face transformers' LlamaForCausalLM (and PEFT's LoRA) in float32 on the
CPU on fixed token ids and writes what tests/test_ch07_model.cpp compares against:
logits, the mean cross-entropy loss and LoRA gradients (the way llm.c checks itself
against PyTorch). Not part of the build: run it where torch, transformers and peft
are installed, then commit the output directory as tests/fixtures/llama/.

    python3 tools/make_llama_fixtures.py --kjv15m-hf ../shared/models/kjv15M-hf \\
        --stories260k ../shared/models/stories260K.bin --out tests/fixtures/llama

Cases:
  kjv15M       the Hugging Face folder (BF16 weights, loaded as float32); MHA, tied classifier.
  stories260K  the llama2.c .bin converted here to a transformers model in memory, with
               transformers' own q/k permutation (convert_llama_weights_to_hf.py); GQA
               (8 heads, 4 kv heads). Our test reads the .bin directly, so agreement also
               checks the permutation.

Per case: B=2 sequences of T=32 input tokens (T+1 ids drawn with a seeded torch generator,
BOS=1 first; inputs = ids[:, :T], targets = ids[:, 1:]); the loss is the mean cross-entropy
over all B*T targets; logits are stored for the positions listed in the index. Then LoRA
(r=4, alpha=8, dropout 0) on all seven projections with deterministic A and B:

    module index m = 7*layer + [q, k, v, o, gate, up, down].index(proj)
    A[i, j] = 0.05 * sin(0.1 * (i * in_features + j) + m)        (r x in)
    B[i, j] = 0.05 * cos(0.1 * (i * r + j) + 2 * m)              (out x r)

in Hugging Face's row order (q/k rows in rotate-half order); the test fills the same values
into the model, whose q/k rows are in that order too. The LoRA loss, logits and dA/dB (the
.grad of lora_A / lora_B after loss.backward()) of the listed modules are stored.

Files: little-endian float32 arrays, row-major, described in index.json.
"""
import argparse
import json
import math
import os
import struct

import torch
import torch.nn.functional as F
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

import peft
from peft import LoraConfig, get_peft_model

PROJS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
B, T, SEED = 2, 32, 1234
LORA_R, LORA_ALPHA = 4, 8


def module_path(layer, proj):
    kind = "self_attn" if proj in PROJS[:4] else "mlp"
    return f"model.layers.{layer}.{kind}.{proj}"


def read_llama2c(path):
    """stories260K-style .bin -> (transformers LlamaConfig, state dict in HF layout)."""
    with open(path, "rb") as f:
        data = f.read()
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = struct.unpack("<7i", data[:28])
    shared = vocab > 0
    vocab = abs(vocab)
    hs = dim // n_heads
    kv_dim = hs * n_kv
    flat = torch.frombuffer(bytearray(data[28:]), dtype=torch.float32)
    pos = 0

    def take(*shape):
        nonlocal pos
        n = math.prod(shape)
        t = flat[pos:pos + n].reshape(shape).clone()
        pos += n
        return t

    emb = take(vocab, dim)
    rms_att = take(n_layers, dim)
    wq = take(n_layers, dim, dim)
    wk = take(n_layers, kv_dim, dim)
    wv = take(n_layers, kv_dim, dim)
    wo = take(n_layers, dim, dim)
    rms_ffn = take(n_layers, dim)
    w1 = take(n_layers, hidden, dim)
    w2 = take(n_layers, dim, hidden)
    w3 = take(n_layers, hidden, dim)
    rms_final = take(dim)
    take(seq_len, hs // 2)  # legacy RoPE tables
    take(seq_len, hs // 2)
    wcls = None if shared else take(vocab, dim)

    # transformers' convert_llama_weights_to_hf.py: interleaved pairs -> rotate-half rows.
    def permute(w, heads):
        rows, cols = w.shape
        return w.view(heads, rows // heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)

    sd = {"model.embed_tokens.weight": emb, "model.norm.weight": rms_final}
    for l in range(n_layers):
        p = f"model.layers.{l}."
        sd[p + "input_layernorm.weight"] = rms_att[l]
        sd[p + "post_attention_layernorm.weight"] = rms_ffn[l]
        sd[p + "self_attn.q_proj.weight"] = permute(wq[l], n_heads)
        sd[p + "self_attn.k_proj.weight"] = permute(wk[l], n_kv)
        sd[p + "self_attn.v_proj.weight"] = wv[l]
        sd[p + "self_attn.o_proj.weight"] = wo[l]
        sd[p + "mlp.gate_proj.weight"] = w1[l]
        sd[p + "mlp.down_proj.weight"] = w2[l]
        sd[p + "mlp.up_proj.weight"] = w3[l]
    if wcls is not None:
        sd["lm_head.weight"] = wcls
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=dim, intermediate_size=hidden, num_hidden_layers=n_layers,
                      num_attention_heads=n_heads, num_key_value_heads=n_kv, max_position_embeddings=seq_len,
                      rms_norm_eps=1e-5, tie_word_embeddings=shared, hidden_act="silu",
                      attention_bias=False, mlp_bias=False, bos_token_id=1, eos_token_id=2)
    return cfg, sd


def load_stories(path):
    cfg, sd = read_llama2c(path)
    model = LlamaForCausalLM(cfg).float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "lm_head.weight" and name not in sd:
                continue  # tied to the embedding
            p.copy_(sd[name])
    if cfg.tie_word_embeddings:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    return model


def load_hf(path):
    # No dtype argument (its name changed across transformers versions): whatever dtype it
    # loads in, the BF16 checkpoint values convert to float32 exactly.
    model = LlamaForCausalLM.from_pretrained(path).float()
    return model


def fill_lora(model, n_layers):
    """Writes the closed-form A and B into every PEFT LoRA module."""
    mods = dict(model.named_modules())
    with torch.no_grad():
        for layer in range(n_layers):
            for k, proj in enumerate(PROJS):
                m = 7 * layer + k
                mod = mods["base_model.model." + module_path(layer, proj)]
                A = mod.lora_A["default"].weight
                Bw = mod.lora_B["default"].weight
                r, fan_in = A.shape
                out = Bw.shape[0]
                A.copy_(torch.tensor([[0.05 * math.sin(0.1 * (i * fan_in + j) + m) for j in range(fan_in)]
                                      for i in range(r)], dtype=torch.float64).float())
                Bw.copy_(torch.tensor([[0.05 * math.cos(0.1 * (i * r + j) + 2 * m) for j in range(r)]
                                       for i in range(out)], dtype=torch.float64).float())
    return mods


def write_f32(out_dir, name, tensor):
    t = tensor.detach().to(torch.float32).contiguous().cpu()
    with open(os.path.join(out_dir, name), "wb") as f:
        f.write(struct.pack(f"<{t.numel()}f", *t.flatten().tolist()))
    return {"file": name, "shape": list(t.shape)}


def run_case(name, source, model, out_dir, logit_positions, lora_logit_positions, grad_layers):
    torch.manual_seed(0)
    cfg = model.config
    V = cfg.vocab_size
    gen = torch.Generator().manual_seed(SEED)
    ids = torch.randint(3, V, (B, T + 1), generator=gen)
    ids[:, 0] = 1
    inputs, targets = ids[:, :T], ids[:, 1:]

    model.eval()
    with torch.no_grad():
        logits = model(input_ids=inputs).logits.float()
    loss = F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1)).item()
    case = {"name": name, "model": source, "B": B, "T": T, "vocab_size": V, "tokens": ids.tolist(),
            "loss": loss, "logit_positions": logit_positions,
            "logits": write_f32(out_dir, f"{name}_logits.bin", logits[:, logit_positions, :])}

    lcfg = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=PROJS, bias="none",
                      task_type="CAUSAL_LM")
    pm = get_peft_model(model, lcfg)
    mods = fill_lora(pm, cfg.num_hidden_layers)
    pm.train()  # dropout is 0, so train mode changes nothing but enables grads
    lora_logits = pm(input_ids=inputs).logits.float()
    lora_loss = F.cross_entropy(lora_logits.reshape(-1, V), targets.reshape(-1))
    lora_loss.backward()
    grads = []
    for layer in grad_layers:
        for proj in PROJS:
            mod = mods["base_model.model." + module_path(layer, proj)]
            stem = f"{name}_l{layer}_{proj}"
            grads.append({"module": module_path(layer, proj),
                          "dA": write_f32(out_dir, stem + "_dA.bin", mod.lora_A["default"].weight.grad),
                          "dB": write_f32(out_dir, stem + "_dB.bin", mod.lora_B["default"].weight.grad)})
    case["lora"] = {"r": LORA_R, "alpha": LORA_ALPHA, "loss": lora_loss.item(),
                    "logit_positions": lora_logit_positions,
                    "logits": write_f32(out_dir, f"{name}_lora_logits.bin",
                                        lora_logits.detach()[:, lora_logit_positions, :]),
                    "grads": grads}
    print(f"{name}: loss {loss:.6f}, LoRA loss {lora_loss.item():.6f}, {len(grads)} modules with gradients")
    return case


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kjv15m-hf", default="../shared/models/kjv15M-hf")
    ap.add_argument("--stories260k", default="../shared/models/stories260K.bin")
    ap.add_argument("--out", default="tests/fixtures/llama")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch.set_num_threads(max(1, os.cpu_count() or 1))

    cases = []
    st = load_stories(args.stories260k)
    cases.append(run_case("stories260K", "stories260K.bin", st, args.out, logit_positions=list(range(T)),
                          lora_logit_positions=[T - 4, T - 3, T - 2, T - 1],
                          grad_layers=list(range(st.config.num_hidden_layers))))
    kjv = load_hf(args.kjv15m_hf)
    cases.append(run_case("kjv15M", "kjv15M-hf", kjv, args.out, logit_positions=[T - 2, T - 1],
                          lora_logit_positions=[T - 2, T - 1], grad_layers=[0, kjv.config.num_hidden_layers - 1]))

    index = {"generator": "tools/make_llama_fixtures.py", "torch": torch.__version__,
             "transformers": transformers.__version__, "peft": peft.__version__, "device": "cpu",
             "dtype": "float32", "lora_formula": {
                 "A": "0.05*sin(0.1*(i*in+j)+m)", "B": "0.05*cos(0.1*(i*r+j)+2*m)",
                 "m": "7*layer + [q,k,v,o,gate,up,down].index(proj)"},
             "cases": cases}
    with open(os.path.join(args.out, "index.json"), "w") as f:
        json.dump(index, f, indent=1)
    total = sum(os.path.getsize(os.path.join(args.out, n)) for n in os.listdir(args.out))
    print(f"wrote {args.out} ({total / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
