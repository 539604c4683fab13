#!/usr/bin/env python3
"""Prompt-template fixtures for chapter 8's template test (tests/test_ch08_templates.cpp).

Renders fixed conversations and instruction records through transformers' apply_chat_template
(and, for Alpaca, through the Stanford Alpaca prompt strings) with the LLaMA-2 SentencePiece
tokenizer, and the same conversations and five more through the llama3 template with a LLaMA-3
tokenizer, and records what our C++ templates must reproduce token for token. Not part of the
build: run it where transformers 5.x (or 4.4x), tokenizers, sentencepiece and protobuf are
installed, from the repository root, then commit the output (both files):

    python3 tools/make_template_fixtures.py --out tests/fixtures/templates

The tokenizer is ../shared/models/tokenizer.model (else $QLORA_MODELS_DIR/tokenizer.model, else
./models/tokenizer.model; --tokenizer overrides), copied into a temporary folder with a
tokenizer_config.json and loaded with transformers' LlamaTokenizerFast (in 5.x an alias of
LlamaTokenizer, the tokenizers-library backend), with legacy=True: every run of text between
two special tokens gets SentencePiece's dummy-prefix space, so "<s>[INST]" is <s> ▁[ INST ],
which is what Meta's reference code (one SentencePiece encode per turn) produces.

Templates:
  llama2  Meta's Llama-2-chat template, verbatim from meta-llama/Llama-2-7b-chat-hf's
          tokenizer_config.json: BOS before every [INST], " answer </s>" after every
          assistant turn, the system prompt inside the first [INST] between <<SYS>> markers,
          no generation prompt (a conversation ending with a user turn ends in "[/INST]").
  chatml  The standard ChatML template (OpenHermes, Qwen): "<|im_start|>role\\ncontent<|im_end|>\\n"
          per message, "<|im_start|>assistant\\n" as the generation prompt, no BOS, no EOS.
          <|im_start|> and <|im_end|> are PLAIN TEXT here, not added special tokens: the
          LLaMA-2 vocabulary has no such tokens, and adding them would need new embedding rows
          that LoRA does not train. So the whole rendering is one SentencePiece text.
  alpaca  Stanford Alpaca's PROMPT_DICT (prompt_input / prompt_no_input) as in its train.py:
          source = the prompt with instruction (and input); the example is source + output +
          "</s>", tokenized with add_special_tokens (BOS first); the first len(tokenize(source))
          tokens are the prompt. The generation prompt is the source alone.
  llama3  Meta's Llama-3-Instruct template, verbatim: the "chat_template" of
          meta-llama/Meta-Llama-3-8B-Instruct's tokenizer_config.json, as quoted in full in that
          repository's discussion https://huggingface.co/meta-llama/Meta-Llama-3-8B-Instruct/discussions/103
          and in the diff that copies the file,
          https://huggingface.co/catid/cat-llama-3-8b-instruct-aqlm-noft/commit/f9b1eb62091f76bd1f99b0961801c5722452d429
          bos_token (<|begin_of_text|>) once, then per message "<|start_header_id|>" + role +
          "<|end_header_id|>\n\n" + content|trim + "<|eot_id|>"; the generation prompt is
          "<|start_header_id|>assistant<|end_header_id|>\n\n". Rendered with chapter 7's
          byte-level BPE fixture, tests/fixtures/bpe/tokenizer.json and tokenizer_config.json
          (LLaMA-3's pre-tokenizer and special tokens, at ids 4000.. instead of 128000..), copied
          into a temporary folder and loaded with transformers' AutoTokenizer; the markers are
          special tokens there, one id each.

Assistant-token mask. For llama2, chatml and llama3 the published templates have no
{% generation %} markers, so the script also renders a marked copy of each template (the same
text with {% generation %} ... {% endgeneration %} around every assistant turn's output: for
llama2 " content </s>", for chatml "content<|im_end|>", for llama3 "content<|eot_id|>"), checks
that it renders exactly the same string and the same ids as the published one, and takes
transformers' own return_assistant_tokens_mask from it. For alpaca the mask is Stanford
Alpaca's rule above.

Cross-checks. llama2, chatml, alpaca: each rendering's ids are compared with the sentencepiece
library run directly on the text between special tokens (one encode per run, dummy prefix on);
the result is stored as "sentencepiece_agrees" and a disagreement is printed. llama3: the
`tokenizers` library encodes the rendered string directly (add_special_tokens=False), which
must give transformers' ids; the ids must start with the one BOS and hold one <|eot_id|> per
message; and each run of the mask must be one assistant message's stripped content, encoded,
followed by <|eot_id|>. Any of these failing stops the script (exit status 1) before anything
is written.

Output, written only when every case passed, each file atomically:
  OUT/templates.json
  {"transformers": version, "tokenizer_class": ..., "legacy": true, "bos_id": 1, "eos_id": 2,
   "templates": {"llama2": jinja, "chatml": jinja, "alpaca": {"prompt_input": ..., "prompt_no_input": ...}},
   "cases": [{"name", "template", "add_generation_prompt", "messages" | "record",
              "rendered", "ids", "assistant_mask", "sentencepiece_agrees"}]}
  OUT/templates-llama3.json (a file of its own: another tokenizer, and other cross-checks)
  {"transformers": version, "tokenizers": version, "tokenizer_class": ...,
   "tokenizer_file": "bpe/tokenizer.json" (under tests/fixtures), "tokenizer_sha256": ...,
   "bos_id": 4000, "special_ids": {"<|begin_of_text|>": 4000, ...}, "template": jinja,
   "template_source": url,
   "cases": [{"name", "template": "llama3", "add_generation_prompt", "messages",
              "rendered", "ids", "assistant_mask"}]}
"""
import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BPE_DIR = os.path.join(REPO, "tests", "fixtures", "bpe")

LLAMA2_CHAT = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)
# The same template with the assistant output inside {% generation %}; must render identically.
LLAMA2_CHAT_MARKED = LLAMA2_CHAT.replace(
    "{{ ' '  + content.strip() + ' ' + eos_token }}",
    "{% generation %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endgeneration %}")

CHATML = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CHATML_MARKED = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\\n'}}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}"
    "{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Meta's Llama-3-Instruct template, verbatim (sources in the docstring).
LLAMA3_INSTRUCT = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim"
    " + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
LLAMA3_SOURCE = "https://huggingface.co/meta-llama/Meta-Llama-3-8B-Instruct (tokenizer_config.json, chat_template)"
# The same, each message's header written first and the assistant's "content|trim + <|eot_id|>"
# inside {% generation %}; must render identically.
LLAMA3_INSTRUCT_MARKED = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set header = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' %}"
    "{% if loop.index0 == 0 %}{% set header = bos_token + header %}{% endif %}{{ header }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] | trim + '<|eot_id|>' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]

ALPACA = {
    "prompt_input": (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
    ),
    "prompt_no_input": (
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Response:"
    ),
}

SYSTEM = "You are a concise dictionary. Answer with one definition."
CONVERSATIONS = [
    # (name, messages, add_generation_prompt)
    ("single", [
        {"role": "user", "content": "What does abandon mean as a verb?"},
        {"role": "assistant", "content": "forsake, leave behind"},
    ], False),
    ("system", [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "What does harbor mean as a noun?"},
        {"role": "assistant", "content": "a sheltered port where ships can take on or discharge cargo"},
    ], False),
    ("multi_turn", [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "Define ephemeral."},
        {"role": "assistant", "content": "lasting a very short time"},
        {"role": "user", "content": "Use it in a sentence."},
        {"role": "assistant", "content": "The ephemeral beauty of a snowflake."},
        {"role": "user", "content": "And a synonym?"},
        {"role": "assistant", "content": "transient"},
    ], False),
    ("multi_turn_no_system", [
        {"role": "user", "content": "Is a whale a fish?"},
        {"role": "assistant", "content": "No; it is a mammal."},
        {"role": "user", "content": "Why?"},
        {"role": "assistant", "content": "It breathes air and nurses its young.\n\nMost fish do neither."},
    ], False),
    # Leading and trailing whitespace: llama2 strips it (content.strip()), chatml keeps it.
    ("unicode_whitespace", [
        {"role": "system", "content": "  Réponds en français — brièvement.  "},
        {"role": "user", "content": "  Que veut dire « naïf » ? 日本語も 🙂\n"},
        {"role": "assistant", "content": " Qui manque d'expérience; candide. ✓ "},
    ], False),
    ("generation_prompt", [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "What does abandon mean as a verb?"},
        {"role": "assistant", "content": "forsake, leave behind"},
        {"role": "user", "content": "And as a noun?"},
    ], True),
    ("generation_prompt_first_turn", [
        {"role": "user", "content": "What does quixotic mean?"},
    ], True),
]

# Besides CONVERSATIONS, for llama3: what its trim strips (Python's str.strip: Unicode spaces,
# the \x1c-\x1f separators, U+2028; not the zero-width space), a blank answer (its <|eot_id|>
# alone is the answer), digits, contractions, code and CRLF for the pre-tokenizer, roles in an
# order llama2 would refuse, and a generation prompt after a system message alone.
LLAMA3_CONVERSATIONS = [
    ("trim_unicode", [
        {"role": "system", "content": "\u3000\u00a0 Réponds brièvement.\u2003"},
        {"role": "user", "content": "\t\u200bLe mot « naïf » ?\u2028"},
        {"role": "assistant", "content": "\n\n  Qui manque d'expérience — candide. 🙂\r\n\x1c"},
    ], False),
    ("blank_answer", [
        {"role": "user", "content": "Say nothing."},
        {"role": "assistant", "content": " \t\n"},
    ], False),
    ("numbers_code", [
        {"role": "user", "content": "Add 12345 and 678.\r\n\r\nThen print it:\n```py\nprint(x)\n```"},
        {"role": "assistant", "content": "It's 13023; I'd write:\n\n```py\nprint(13023)\n```"},
    ], False),
    ("roles_any_order", [
        {"role": "user", "content": "Define moor."},
        {"role": "user", "content": "As a verb."},
        {"role": "assistant", "content": "secure a boat with ropes or an anchor"},
        {"role": "assistant", "content": "(also: a tract of open upland, as a noun)"},
    ], False),
    ("system_then_generation_prompt", [
        {"role": "system", "content": SYSTEM},
    ], True),
]

RECORDS = [
    # (name, record, add_generation_prompt)
    ("no_input", {"instruction": "What does abandon mean as a verb?", "output": "forsake, leave behind"}, False),
    ("with_input", {"instruction": "Give the part of speech of the word.", "input": "swiftly",
                    "output": "adverb"}, False),
    ("unicode", {"instruction": "Traduis « cœur » en anglais.", "input": "", "output": "heart ❤"}, False),
    ("multiline_output", {"instruction": "List two senses of bank.",
                          "output": "1. sloping land beside a body of water\n2. a financial institution"}, False),
    ("generation_prompt", {"instruction": "What does quixotic mean?"}, True),
    ("generation_prompt_with_input", {"instruction": "Define the word.", "input": "harbor"}, True),
]


def find_tokenizer(arg):
    if arg:
        candidates = [arg]
    else:
        candidates = ["../shared/models/tokenizer.model"]
        if os.environ.get("QLORA_MODELS_DIR"):
            candidates.insert(0, os.path.join(os.environ["QLORA_MODELS_DIR"], "tokenizer.model"))
        candidates.append("models/tokenizer.model")
    for c in candidates:
        if os.path.isfile(c):
            return c
    sys.exit("make_template_fixtures.py: no tokenizer.model found (tried " + ", ".join(candidates) +
             "); pass --tokenizer PATH")


def load_tokenizer(model_file, sp, tmp):
    import transformers
    shutil.copyfile(model_file, os.path.join(tmp, "tokenizer.model"))
    config = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
              "add_bos_token": True, "add_eos_token": False, "add_prefix_space": True, "legacy": True,
              "clean_up_tokenization_spaces": False, "model_max_length": 4096}
    with open(os.path.join(tmp, "tokenizer_config.json"), "w") as f:
        json.dump(config, f)
    cls = getattr(transformers, "LlamaTokenizerFast", None) or transformers.LlamaTokenizer
    kwargs = {"legacy": True, "add_prefix_space": True}
    if transformers.__version__.startswith("4."):
        kwargs["from_slow"] = True  # 4.x: build the fast tokenizer from tokenizer.model with legacy honoured
    tok = cls.from_pretrained(tmp, **kwargs)
    # The convention every fixture relies on: a dummy-prefix space after a special token
    # (with the LLaMA-2 vocabulary, [1, 518, 25580, 29962]: <s> ▁[ INST ]).
    probe = tok("<s>[INST]", add_special_tokens=False)["input_ids"]
    expected = [1] + sp.encode("[INST]")
    if probe != expected:
        sys.exit(f"make_template_fixtures.py: {cls.__name__} did not load in legacy mode: '<s>[INST]' -> {probe}, "
                 f"expected {expected}")
    return tok


def flat(ids):
    ids = list(ids)
    return list(ids[0]) if ids and isinstance(ids[0], (list, tuple)) else ids


def sentencepiece_ids(sp, text, specials):
    """One SentencePiece encode per run of text between special tokens."""
    out, run, i = [], "", 0
    while i < len(text):
        hit = next((s for s in specials if text.startswith(s, i)), None)
        if hit is None:
            run += text[i]
            i += 1
            continue
        if run:
            out += sp.encode(run)
            run = ""
        out.append(specials[hit])
        i += len(hit)
    if run:
        out += sp.encode(run)
    return out


def fail(msg):
    print("make_template_fixtures.py: " + msg, file=sys.stderr)
    sys.exit(1)


def chat_case(tok, template, published, marked, name, messages, add_generation_prompt):
    """apply_chat_template's rendering, ids and assistant mask (from the marked copy)."""
    rendered = tok.apply_chat_template(messages, chat_template=published, tokenize=False,
                                       add_generation_prompt=add_generation_prompt)
    plain = tok.apply_chat_template(messages, chat_template=published, tokenize=True, return_dict=True,
                                    add_generation_prompt=add_generation_prompt)
    ids = flat(plain["input_ids"])
    rendered_marked = tok.apply_chat_template(messages, chat_template=marked, tokenize=False,
                                              add_generation_prompt=add_generation_prompt)
    with_mask = tok.apply_chat_template(messages, chat_template=marked, tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True,
                                        add_generation_prompt=add_generation_prompt)
    if rendered_marked != rendered or flat(with_mask["input_ids"]) != ids:
        fail(f"{template}/{name}: the marked template renders differently from the published one:\n"
             f"{rendered!r}\n{rendered_marked!r}")
    mask = [int(m) for m in flat(with_mask["assistant_masks"])]
    if len(mask) != len(ids):
        fail(f"{template}/{name}: mask of {len(mask)} for {len(ids)} ids")
    return {"name": name, "template": template, "add_generation_prompt": add_generation_prompt,
            "messages": messages, "rendered": rendered, "ids": ids, "assistant_mask": mask}


def mask_runs(ids, mask):
    """The ids under each maximal run of 1s in the mask."""
    runs = []
    for i, (token, m) in enumerate(zip(ids, mask)):
        if m and (i == 0 or not mask[i - 1]):
            runs.append([])
        if m:
            runs[-1].append(token)
    return runs


def check_llama3_case(case, encode, special_ids):
    """Fails unless a llama3 case is what the template and the tokenizer say it must be.

    encode: the `tokenizers` library's encode(text) -> ids, add_special_tokens=False."""
    where = f"llama3/{case['name']}"
    ids, messages = case["ids"], case["messages"]
    direct = encode(case["rendered"])
    if direct != ids:
        fail(f"{where}: transformers' ids differ from the tokenizers library's on the rendered text:\n"
             f"{ids}\n{direct}")
    bos, start, eot = (special_ids[s] for s in ("<|begin_of_text|>", "<|start_header_id|>", "<|eot_id|>"))
    if ids[:1] != [bos] or ids.count(bos) != 1:
        fail(f"{where}: expected one BOS ({bos}) first, got {ids[:3]}... with {ids.count(bos)} BOS "
             "(did the tokenizer add its own BOS to the template's?)")
    headers = len(messages) + (1 if case["add_generation_prompt"] else 0)
    if ids.count(eot) != len(messages) or ids.count(start) != headers:
        fail(f"{where}: {ids.count(eot)} <|eot_id|> and {ids.count(start)} <|start_header_id|> for "
             f"{len(messages)} messages (the markers must be single special tokens)")
    answers = [encode(m["content"].strip()) + [eot] for m in messages if m["role"] == "assistant"]
    runs = mask_runs(ids, case["assistant_mask"])
    if runs != answers:
        fail(f"{where}: the assistant mask covers {runs}, expected each answer's stripped content and its "
             f"<|eot_id|>: {answers}")


def load_llama3_tokenizer(tmp):
    """The BPE fixture through transformers, and its special ids, checked against tokenizers'."""
    import tokenizers
    import transformers
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(os.path.join(BPE_DIR, f), os.path.join(tmp, f))
    tok = transformers.AutoTokenizer.from_pretrained(tmp)
    bpe = tokenizers.Tokenizer.from_file(os.path.join(BPE_DIR, "tokenizer.json"))
    special_ids = {}
    for s in LLAMA3_SPECIALS:
        ours, theirs = tok.convert_tokens_to_ids(s), bpe.token_to_id(s)
        if ours is None or ours != theirs or tok.unk_token_id is not None and ours == tok.unk_token_id:
            fail(f"{BPE_DIR}: special token {s} is {ours} in transformers, {theirs} in tokenizers")
        special_ids[s] = ours
    if tok.bos_token != "<|begin_of_text|>" or tok.bos_token_id != special_ids["<|begin_of_text|>"]:
        fail(f"{BPE_DIR}: bos_token is {tok.bos_token!r} ({tok.bos_token_id}), expected <|begin_of_text|>")
    return tok, (lambda text: bpe.encode(text, add_special_tokens=False).ids), special_ids


def alpaca_case(tok, sp, name, record, add_generation_prompt):
    key = "prompt_input" if record.get("input") else "prompt_no_input"
    source = ALPACA[key].format_map(record)
    source_ids = tok(source)["input_ids"]
    if add_generation_prompt:
        rendered, ids = source, list(source_ids)
        mask = [0] * len(ids)
    else:
        rendered = source + record["output"] + tok.eos_token
        ids = tok(rendered)["input_ids"]
        mask = [0 if i < len(source_ids) else 1 for i in range(len(ids))]
    expected = [1] + sentencepiece_ids(sp, rendered, {"</s>": 2})
    # "rendered" spells out the BOS that add_special_tokens puts first, as the chat templates do.
    return {"name": name, "template": "alpaca", "add_generation_prompt": add_generation_prompt,
            "record": record, "rendered": tok.bos_token + rendered, "ids": list(ids), "assistant_mask": mask,
            "sentencepiece_agrees": expected == list(ids)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output folder (tests/fixtures/templates)")
    ap.add_argument("--tokenizer", help="LLaMA-2 tokenizer.model (default: see above)")
    args = ap.parse_args()
    try:
        import sentencepiece
        import tokenizers
        import transformers
    except ImportError as e:
        sys.exit(f"make_template_fixtures.py needs transformers, tokenizers, sentencepiece and protobuf: {e}")

    model_file = find_tokenizer(args.tokenizer)
    sp = sentencepiece.SentencePieceProcessor(model_file=model_file)
    with tempfile.TemporaryDirectory() as tmp:
        tok = load_tokenizer(model_file, sp, tmp)
        cases = []
        for template, published, marked in (("llama2", LLAMA2_CHAT, LLAMA2_CHAT_MARKED),
                                             ("chatml", CHATML, CHATML_MARKED)):
            for name, messages, gen in CONVERSATIONS:
                c = chat_case(tok, template, published, marked, name, messages, gen)
                c["sentencepiece_agrees"] = sentencepiece_ids(sp, c["rendered"], {"<s>": 1, "</s>": 2}) == c["ids"]
                cases.append(c)
        for name, record, gen in RECORDS:
            cases.append(alpaca_case(tok, sp, name, record, gen))
        tokenizer_class = type(tok).__name__
    with tempfile.TemporaryDirectory() as tmp:
        tok3, encode, special_ids = load_llama3_tokenizer(tmp)
        llama3_cases = []
        for name, messages, gen in CONVERSATIONS + LLAMA3_CONVERSATIONS:
            c = chat_case(tok3, "llama3", LLAMA3_INSTRUCT, LLAMA3_INSTRUCT_MARKED, name, messages, gen)
            check_llama3_case(c, encode, special_ids)
            llama3_cases.append(c)
        llama3_class = type(tok3).__name__

    for c in cases + llama3_cases:
        n_assistant = sum(c["assistant_mask"])
        note = "" if c.get("sentencepiece_agrees", True) else "   (differs from sentencepiece run directly!)"
        print(f"{c['template']:7s} {c['name']:30s} {len(c['ids']):4d} ids, {n_assistant:3d} assistant{note}")
    doc = {"transformers": transformers.__version__, "tokenizer_class": tokenizer_class, "legacy": True,
           "tokenizer_file": os.path.basename(model_file), "bos_id": 1, "eos_id": 2,
           "templates": {"llama2": LLAMA2_CHAT, "chatml": CHATML, "alpaca": ALPACA},
           "cases": cases}
    with open(os.path.join(BPE_DIR, "tokenizer.json"), "rb") as f:
        bpe_sha256 = hashlib.sha256(f.read()).hexdigest()
    llama3_doc = {"transformers": transformers.__version__, "tokenizers": tokenizers.__version__,
                  "tokenizer_class": llama3_class, "tokenizer_file": "bpe/tokenizer.json",
                  "tokenizer_sha256": bpe_sha256, "bos_id": special_ids["<|begin_of_text|>"],
                  "special_ids": special_ids, "template": LLAMA3_INSTRUCT, "template_source": LLAMA3_SOURCE,
                  "cases": llama3_cases}
    os.makedirs(args.out, exist_ok=True)
    for name, d in (("templates.json", doc), ("templates-llama3.json", llama3_doc)):
        write_json(os.path.join(args.out, name), d)
        print(f"wrote {os.path.join(args.out, name)}: {len(d['cases'])} cases (transformers "
              f"{transformers.__version__}, {d['tokenizer_class']})")


def write_json(target, doc):
    """Writes doc to target atomically: a reader sees the old file or the whole new one."""
    fd, tmp_path = tempfile.mkstemp(dir=os.path.dirname(target), prefix="." + os.path.basename(target) + ".")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(doc, f, ensure_ascii=False, indent=1)
            f.write("\n")
        os.replace(tmp_path, target)
    except BaseException:
        os.unlink(tmp_path)
        raise


if __name__ == "__main__":
    main()
