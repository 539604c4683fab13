#!/usr/bin/env python3
"""Byte-level BPE fixtures for chapter 7's tokenizer test (tests/test_ch07_bpe_tokenizer.cpp).

Trains two small byte-level BPE tokenizers with Hugging Face `tokenizers` and records how
`tokenizers` itself encodes and decodes a set of test strings. The C++ ByteLevelBpeTokenizer
must give the same ids and the same text. Not part of the build: run it where `tokenizers`
(0.19 or later: BPE's ignore_merges) is installed, from the repository root, and commit the
output:

    python3 tools/make_bpe_fixtures.py --out tests/fixtures/bpe

Inputs: tests/fixtures/bpe/mixed.txt (committed: many scripts, contractions, numbers, code,
whitespace, emoji, the special-token strings) and, when found, the first 200 KB of
tinyshakespeare.txt (--shakespeare, else $QLORA_DATA_DIR, ../shared/data, ./data, ./shared/data,
./.carry/shared/data).

Outputs, in OUT/ (LLaMA-3's layout) and OUT/gpt2/ (GPT-2's layout):
  tokenizer.json         as `tokenizers` saved it
  tokenizer_config.json  bos_token / eos_token, as transformers reads them
  cases.json             [{name, text, ids, decoded}] with ids = encode(text,
                         add_special_tokens=False).ids and decoded = decode(ids,
                         skip_special_tokens=True); a piece of tinyshakespeare.txt is named by
                         {name, text_from: {file, offset, length}, ids} (its decoded text is
                         itself) so that no shared data is copied into the repository; plus "single_ids": decode([id],
                         skip_special_tokens=True) for every id (partial UTF-8 becomes U+FFFD)
and OUT/manifest.json with the versions, the inputs' hashes and what each fixture exercises.

LLaMA-3 layout: pre-tokenizer Sequence[Split(LLaMA-3's regex, "isolated"), ByteLevel(
add_prefix_space=False, use_regex=False)], BPE with ignore_merges=True, ByteLevel decoder,
LLaMA-3.1's first special tokens added after the learned vocabulary (as 128000.. are). The
last DROPPED_MERGES merges are removed after training, so that their tokens are reachable only
through ignore_merges (a whole pre-token that is in the vocabulary), as some of LLaMA-3's are.
GPT-2 layout: pre-tokenizer ByteLevel(add_prefix_space=False, use_regex=True), BPE without
ignore_merges, ByteLevel decoder, <|endoftext|>.

The script fails (exit status 1) when the saved files do not have the layout above, when
transformers is installed and disagrees with `tokenizers`, or when a case does not round-trip.
"""
import argparse
import hashlib
import json
import os
import random
import re
import sys

import tokenizers
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                  r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# LLaMA-3.1's ids 128000..128011, in order.
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                   "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>",
                   "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>",
                   "<|reserved_special_token_3|>"]
GPT2_SPECIALS = ["<|endoftext|>"]
SHAKESPEARE_BYTES = 200_000
DROPPED_MERGES = 40
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIXED = os.path.join(REPO, "tests", "fixtures", "bpe", "mixed.txt")


def fail(msg):
    print("make_bpe_fixtures: " + msg, file=sys.stderr)
    sys.exit(1)


def sha256(data):
    return hashlib.sha256(data).hexdigest()


def find_shakespeare(arg):
    if arg:
        if not os.path.isfile(arg):
            fail(f"--shakespeare {arg}: no such file")
        return arg
    dirs = [os.environ.get("QLORA_DATA_DIR", ""), os.path.join(REPO, "..", "shared", "data"), os.path.join(REPO, "data"),
            os.path.join(REPO, "shared", "data"), os.path.join(REPO, ".carry", "shared", "data")]
    for d in dirs:
        p = os.path.join(d, "tinyshakespeare.txt")
        if d and os.path.isfile(p):
            return p
    return None


def edge_cases():
    """Hand-picked strings: whitespace shapes, digits, contractions, special-token spellings."""
    return {
        "empty": "",
        "space": " ",
        "two spaces": "  ",
        "newline": "\n",
        "newlines": "\n\n\n",
        "crlf": "\r\n",
        "crlf x2": "\r\n\r\n",
        "cr": "\r",
        "tab": "\t",
        "spaces newline spaces": "   \n   ",
        "word spaces word": "a   b",
        "spaces before newline": "a  \n b",
        "trailing spaces": "end   ",
        "leading spaces": "   start",
        "tabs and spaces": " \t \t\n\tx",
        "crlf text": "line one\r\nline two\r\n\r\nline four\r\n",
        "cr text": "old\rmac\r",
        "digits 1..12": " ".join("1234567890ab"[:n] for n in range(1, 13)),
        "digit run": "12345678901234567890",
        "number forms": "3.14159 2026-12-02 1,000 -0.5e-3 x1y22z333",
        "contraction alone": "'s",
        "contractions": "don't DON'T Don'T He'S they'Ll I'M we'VE you'Re it'D",
        "contraction long s": "it'ſ",
        "nbsp": "a\u00a0b \u00a0 c\u00a0",
        "ideographic space": "\u3000x\u3000\u3000",
        "decomposed accent": "cafe\u0301",
        "zwj family": "\U0001F468\u200d\U0001F469\u200d\U0001F467\u200d\U0001F466",
        "skin tones": "\U0001F44D\U0001F3FB\U0001F44D\U0001F3FF",
    }


def special_cases(specials):
    first = specials[0]
    last = specials[-1]
    return {
        "special alone": first,
        "special twice": first + first,
        "special between words": f"Hello{last}world",
        "special with spaces": f" {first} {last} ",
        "special newline": f"{first}\n\n{last}\n",
        "special unclosed": first[:-2],
        "special uppercase": first.upper(),
        "special doubled brackets": f"<{first}>",
        "all specials": " ".join(specials),
    }


def llama3_chat(user, assistant):
    return ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are helpful.<|eot_id|>"
            f"<|start_header_id|>user<|end_header_id|>\n\n{user}<|eot_id|>"
            f"<|start_header_id|>assistant<|end_header_id|>\n\n{assistant}<|eot_id|>")


def random_strings(pool, count, seed):
    """Short strings of characters drawn from `pool`: many regex branches meet at random."""
    rng = random.Random(seed)
    return [("".join(rng.choice(pool) for _ in range(rng.randint(1, 40)))) for _ in range(count)]


def build(pre_tokenizer, ignore_merges, vocab_size, specials, corpus):
    model = models.BPE(ignore_merges=ignore_merges) if ignore_merges else models.BPE()
    tok = Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer=trainer)
    if ignore_merges:
        # A trained vocabulary is rebuilt by its own merges, so ignore_merges would change
        # nothing. LLaMA-3's (converted from tiktoken) is not: some tokens are reached only
        # as whole pre-tokens. Dropping the last merges makes their tokens such tokens.
        doc = json.loads(tok.to_str())
        doc["model"]["merges"] = doc["model"]["merges"][:-DROPPED_MERGES]
        tok = Tokenizer.from_str(json.dumps(doc))
    # Special tokens after the learned vocabulary, as LLaMA-3's 128000.. and GPT-2's 50256.
    # (A special token whose text the training learned would keep the learned id instead.)
    learned = tok.get_vocab_size(with_added_tokens=False)
    tok.add_special_tokens(specials)
    for k, content in enumerate(specials):
        if tok.token_to_id(content) != learned + k:
            fail(f"special token {content!r} has id {tok.token_to_id(content)}, expected {learned + k}")
    bos = tok.token_to_id(specials[0])
    tok.post_processor = processors.TemplateProcessing(single=f"{specials[0]} $A", pair=f"{specials[0]} $A {specials[0]} $B:1",
                                                       special_tokens=[(specials[0], bos)])
    return tok


def check_layout(doc, name, want_pre, ignore_merges):
    m = doc["model"]
    if m.get("type") != "BPE":
        fail(f"{name}: model.type {m.get('type')!r}, expected BPE")
    if ignore_merges and m.get("ignore_merges") is not True:
        fail(f"{name}: model.ignore_merges is {m.get('ignore_merges')!r}; tokenizers {tokenizers.__version__} "
             "is too old (0.19 or later writes it)")
    for field in ("dropout", "unk_token", "continuing_subword_prefix", "end_of_word_suffix"):
        if m.get(field) not in (None, ""):
            fail(f"{name}: model.{field} = {m.get(field)!r}, expected null")
    if m.get("byte_fallback"):
        fail(f"{name}: model.byte_fallback is true")
    if doc.get("normalizer") is not None:
        fail(f"{name}: normalizer {doc['normalizer']!r}, expected null")
    if doc["decoder"].get("type") != "ByteLevel":
        fail(f"{name}: decoder {doc['decoder']!r}, expected ByteLevel")
    pre = doc["pre_tokenizer"]
    if want_pre == "llama3":
        ok = (pre.get("type") == "Sequence" and len(pre["pretokenizers"]) == 2
              and pre["pretokenizers"][0] == {"type": "Split", "pattern": {"Regex": LLAMA3_PATTERN},
                                              "behavior": "Isolated", "invert": False}
              and pre["pretokenizers"][1].get("type") == "ByteLevel"
              and pre["pretokenizers"][1].get("add_prefix_space") is False
              and pre["pretokenizers"][1].get("use_regex") is False)
    else:
        ok = pre.get("type") == "ByteLevel" and pre.get("add_prefix_space") is False and pre.get("use_regex") is True
    if not ok:
        fail(f"{name}: unexpected pre_tokenizer {json.dumps(pre)}")
    for t in doc["added_tokens"]:
        if t["lstrip"] or t["rstrip"] or t["single_word"] or t["normalized"] or not t["special"]:
            fail(f"{name}: added token {t} has flags LLaMA-3's do not have")
    merges = m["merges"]
    if not merges:
        fail(f"{name}: no merges")
    return "pairs" if isinstance(merges[0], list) else "strings"


def ignore_merges_cases(tok, doc, limit):
    """Strings that encode differently with and without ignore_merges: each vocabulary token's
    text where BPE's merges alone would not rebuild the token. Without them the fixture would
    not show that ignore_merges is honoured."""
    off = json.loads(json.dumps(doc))
    off["model"]["ignore_merges"] = False
    plain = Tokenizer.from_str(json.dumps(off))
    found = {}
    for tid in range(tok.get_vocab_size(with_added_tokens=False)):
        text = tok.decode([tid], skip_special_tokens=True)
        if not text or "\ufffd" in text:
            continue
        if tok.encode(text, add_special_tokens=False).ids != plain.encode(text, add_special_tokens=False).ids:
            found[f"ignore_merges: token {tid}"] = text
            if len(found) == limit:
                break
    return found


def write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=1)
        f.write("\n")


def shared_form(case):
    """A case whose text is a piece of tinyshakespeare.txt names the piece instead of holding
    it: the shared data is read through the search path, never copied into the repository."""
    m = re.fullmatch(r"shakespeare (?:first (\d+) chars|chunk \d+ at (\d+))", case["name"])
    if not m:
        return case
    if case["decoded"] != case["text"]:
        fail(f"case {case['name']!r}: decodes to other text, so it cannot be stored by reference")
    offset = 0 if m.group(1) else int(m.group(2))  # tinyshakespeare.txt is ASCII: characters are bytes
    return {"name": case["name"], "text_from": {"file": "tinyshakespeare.txt", "offset": offset,
                                                "length": len(case["text"].encode())}, "ids": case["ids"]}


def write_cases(path, cases, single):
    """One case per line: the file stays readable and diffable without an id per line."""
    with open(path, "w", encoding="utf-8") as f:
        f.write('{"cases": [\n')
        f.write(",\n".join(json.dumps(shared_form(c), ensure_ascii=False) for c in cases))
        f.write('\n],\n"single_ids": [\n')
        f.write(",\n".join(json.dumps(t, ensure_ascii=False) for t in single))
        f.write("\n]}\n")


def transformers_check(out_dir, cases, bos, eos):
    """transformers' fast tokenizer over the same folder must agree with `tokenizers`."""
    try:
        import transformers
    except ImportError:
        print("make_bpe_fixtures: transformers not installed, its check skipped")
        return None
    try:
        t = transformers.AutoTokenizer.from_pretrained(out_dir)
    except Exception as e:  # an optional cross-check: say so loudly, record it, go on
        print(f"make_bpe_fixtures: WARNING: transformers {transformers.__version__} cannot load {out_dir}: {e!r}")
        return f"{transformers.__version__}: load failed: {e!r}"
    for c in cases:
        ids = t(c["text"], add_special_tokens=False)["input_ids"]
        if ids != c["ids"]:
            fail(f"{out_dir}: transformers {transformers.__version__} encodes case {c['name']!r} as {ids}, "
                 f"tokenizers as {c['ids']}")
    if t.bos_token_id != bos or t.eos_token_id != eos:  # tokenizer_config.json's spelling: worth a look, not fatal
        print(f"make_bpe_fixtures: WARNING: transformers reads bos/eos {t.bos_token_id}/{t.eos_token_id} from "
              f"{out_dir}/tokenizer_config.json, expected {bos}/{eos}")
        return f"{transformers.__version__}: ids agree; bos/eos read as {t.bos_token_id}/{t.eos_token_id}"
    return transformers.__version__


def make_fixture(out_dir, name, tok, texts, bos_token, eos_token, config_style):
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "tokenizer.json")
    tok.save(path, pretty=True)
    saved = Tokenizer.from_file(path)
    doc = json.loads(open(path, encoding="utf-8").read())
    cases = []
    for case_name, text in texts.items():
        ids = saved.encode(text, add_special_tokens=False).ids
        decoded = saved.decode(ids, skip_special_tokens=True)
        if saved.decode(ids, skip_special_tokens=False) != text:
            fail(f"{name}: case {case_name!r} does not round-trip")
        cases.append({"name": case_name, "text": text, "ids": ids, "decoded": decoded})
    size = saved.get_vocab_size(with_added_tokens=True)
    single = [saved.decode([i], skip_special_tokens=True) for i in range(size)]

    def token_entry(content):
        if config_style == "dict":  # transformers' older AddedToken spelling
            return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": False,
                    "rstrip": False, "single_word": False}
        return content

    config = {"bos_token": token_entry(bos_token), "eos_token": token_entry(eos_token),
              "clean_up_tokenization_spaces": True, "model_input_names": ["input_ids", "attention_mask"],
              "model_max_length": 131072, "tokenizer_class": "PreTrainedTokenizerFast",
              "added_tokens_decoder": {str(t["id"]): {k: t[k] for k in ("content", "lstrip", "normalized", "rstrip",
                                                                          "single_word", "special")}
                                       for t in doc["added_tokens"]}}
    write_json(os.path.join(out_dir, "tokenizer_config.json"), config)
    write_cases(os.path.join(out_dir, "cases.json"), cases, single)
    bos, eos = saved.token_to_id(bos_token), saved.token_to_id(eos_token)
    tf_version = transformers_check(out_dir, cases, bos, eos)
    return doc, {"cases": len(cases), "vocab_size": size, "bos_id": bos, "eos_id": eos, "transformers_checked": tf_version}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="output folder, e.g. tests/fixtures/bpe")
    ap.add_argument("--shakespeare", help="tinyshakespeare.txt (default: searched, see the docstring)")
    args = ap.parse_args()

    mixed_bytes = open(MIXED, "rb").read()
    mixed = mixed_bytes.decode("utf-8")
    shakespeare_path = find_shakespeare(args.shakespeare)
    shakespeare = ""
    if shakespeare_path:
        raw = open(shakespeare_path, "rb").read()[:SHAKESPEARE_BYTES]
        shakespeare = raw.decode("utf-8", errors="strict")
        print(f"make_bpe_fixtures: {len(raw)} bytes of {shakespeare_path}")
    else:
        print("make_bpe_fixtures: WARNING: tinyshakespeare.txt not found; training and cases use mixed.txt only")

    # Training text: mixed.txt with CRLF and tab variants, then Shakespeare.
    corpus = [mixed, mixed.replace("\n", "\r\n"), mixed.replace("    ", "\t")]
    corpus += [shakespeare[i:i + 4000] for i in range(0, len(shakespeare), 4000)]

    # Test strings: shared by both layouts, plus each layout's special-token cases.
    texts = dict(edge_cases())
    for i, line in enumerate(mixed.split("\n")):
        texts[f"mixed.txt line {i + 1}"] = line
    texts["mixed.txt"] = mixed
    texts["mixed.txt with CRLF"] = mixed.replace("\n", "\r\n")
    if shakespeare:
        texts["shakespeare first 10000 chars"] = shakespeare[:10000]
        rng = random.Random(7)
        for k in range(12):
            start = rng.randrange(0, len(shakespeare) - 3000)
            texts[f"shakespeare chunk {k} at {start}"] = shakespeare[start:start + rng.randint(1, 3000)]
    pool = sorted(set(mixed)) + [" ", " ", "  ", "\n", "\r\n", "\t", "'s", "'LL", "123", "<|eot_id|>"]
    for k, s in enumerate(random_strings(pool, 300, seed=12)):
        texts[f"random {k}"] = s

    manifest = {"tokenizers": tokenizers.__version__, "python": sys.version.split()[0],
                "mixed.txt": {"bytes": len(mixed_bytes), "sha256": sha256(mixed_bytes)},
                "tinyshakespeare": None}
    if shakespeare:
        manifest["tinyshakespeare"] = {"path": shakespeare_path, "bytes_used": len(shakespeare.encode()),
                                       "sha256_used": sha256(shakespeare.encode())}

    # LLaMA-3 layout.
    llama3_pre = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])  # trim_offsets: default true
    tok = build(llama3_pre, True, 4000, LLAMA3_SPECIALS, corpus)
    llama3_texts = dict(texts)
    llama3_texts.update(special_cases(LLAMA3_SPECIALS))
    llama3_texts["chat template"] = llama3_chat("What is 2+2?", "4.")
    llama3_texts["chat template multiline"] = llama3_chat("Line one.\nLine two:\n\n  indented", "Done! 👍\n")
    llama3_texts.update(ignore_merges_cases(tok, json.loads(tok.to_str()), limit=40))
    doc, info = make_fixture(args.out, "llama3", tok, llama3_texts, "<|begin_of_text|>", "<|eot_id|>", "string")
    info["merges_format"] = check_layout(doc, "llama3", "llama3", ignore_merges=True)
    info["ignore_merges_cases"] = sum(1 for k in llama3_texts if k.startswith("ignore_merges"))
    if info["ignore_merges_cases"] == 0:
        fail("llama3: no string encodes differently without ignore_merges; the fixture would not test it")
    manifest["llama3"] = info

    # GPT-2 layout.
    gpt2_pre = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok = build(gpt2_pre, False, 1500, GPT2_SPECIALS, corpus)
    gpt2_texts = dict(texts)
    gpt2_texts.update(special_cases(GPT2_SPECIALS))
    doc, info = make_fixture(os.path.join(args.out, "gpt2"), "gpt2", tok, gpt2_texts, "<|endoftext|>", "<|endoftext|>",
                             "dict")
    info["merges_format"] = check_layout(doc, "gpt2", "gpt2", ignore_merges=False)
    manifest["gpt2"] = info

    write_json(os.path.join(args.out, "manifest.json"), manifest)
    print(json.dumps(manifest, indent=1))


if __name__ == "__main__":
    main()
