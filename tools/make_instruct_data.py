#!/usr/bin/env python3
"""A small, real instruction dataset from WordNet, for chapter 8's recipe in miniature.

Reads the WordNet 3.0 database of the Debian package wordnet-base (/usr/share/wordnet, installed
by scripts/setup.sh) and writes, deterministically, two JSONL files that `qlora finetune --data`
reads:

    python3 tools/make_instruct_data.py --out out/instruct-data
    # -> out/instruct-data/train.jsonl, out/instruct-data/held-out.jsonl

The files are generated at run time, not committed: the corpus is a Debian package, and the same
command gives the same bytes anywhere it is installed.

Words: every lemma of index.noun|verb|adj|adv that is one lowercase word of 3 to 14 letters and
has a sense-tagged (frequent) sense; its first sense, WordNet's most frequent, gives the meaning.
The gloss splits into the definition (before the first quoted example) and its examples; a
definition longer than --max-definition characters drops the word.

Records, chosen per word from a hash of the word and its part of speech (so adding words never
changes another word's record; the order and the split below use a second, independent hash):
  - a question, in one of four phrasings ("What does "abandon" mean as a verb?") -> the definition,
    as a conversation ({"messages": [...]}), a quarter of them with a system message;
  - an Alpaca record ({"instruction": "Define the word as a verb.", "input": "abandon",
    "output": definition});
  - a two-turn conversation: the question, the definition, then "Give a synonym." -> another word
    of the synset, or "Use it in a sentence." -> the gloss's first example.

Held out: the (word, part of speech) pairs whose (second) hash falls in the last tenth, so no
held-out meaning is ever trained on (the same word may be trained as another part of speech).
Records are ordered by that hash; --train and --held-out cap their numbers.
"""
import argparse
import hashlib
import json
import os
import re
import sys
import tempfile

POS = {"noun": "n", "verb": "v", "adj": "a", "adv": "r"}
POS_NAME = {"noun": "a noun", "verb": "a verb", "adj": "an adjective", "adv": "an adverb"}
SYSTEM = "You are a dictionary. Answer in a few words."
QUESTIONS = [
    'What does "{w}" mean as {p}?',
    'Define "{w}" ({p}).',
    'What is the meaning of the word "{w}", used as {p}?',
    'Explain "{w}" as {p}.',
]
WORD = re.compile(r"^[a-z]{3,14}$")


def digest(*parts):
    return hashlib.sha1("\x1f".join(parts).encode()).hexdigest()


def read_index(path):
    """lemma -> first synset offset, for lemmas with a sense-tagged sense."""
    out = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.startswith(" "):
                continue  # the license header
            fields = line.split()
            lemma, synset_cnt, p_cnt = fields[0], int(fields[2]), int(fields[3])
            tagsense_cnt = int(fields[5 + p_cnt])
            offsets = fields[6 + p_cnt:6 + p_cnt + synset_cnt]
            if WORD.match(lemma) and tagsense_cnt > 0 and offsets:
                out[lemma] = offsets[0]
    return out


def read_data(path, wanted):
    """offset -> (words of the synset, definition, examples) for the wanted offsets."""
    out = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.startswith(" "):
                continue
            offset = line[:8]
            if offset not in wanted:
                continue
            head, _, gloss = line.partition(" | ")
            fields = head.split()
            w_cnt = int(fields[3], 16)
            words = [re.sub(r"\(.*\)$", "", fields[4 + 2 * i]).replace("_", " ") for i in range(w_cnt)]
            gloss = gloss.strip()
            examples = re.findall(r'"([^"]+)"', gloss)
            definition = gloss.split('; "')[0].strip().rstrip(";").strip()
            out[offset] = (words, definition, examples)
    return out


def question(word, pos, h):
    return QUESTIONS[int(h[1], 16) % len(QUESTIONS)].format(w=word, p=POS_NAME[pos])


def record(word, pos, synset, h):
    words, definition, examples = synset
    kind = int(h[0], 16) % 4  # 0, 1: a question; 2: an Alpaca record; 3: two turns
    if kind == 2:
        return {"instruction": f"Define the word as {POS_NAME[pos]}.", "input": word, "output": definition}
    messages = [{"role": "user", "content": question(word, pos, h)}, {"role": "assistant", "content": definition}]
    synonyms = [w for w in words if w != word]
    if kind == 3 and (synonyms or examples):
        if synonyms and (not examples or int(h[2], 16) % 2 == 0):
            messages += [{"role": "user", "content": "Give a synonym."},
                         {"role": "assistant", "content": synonyms[0]}]
        else:
            messages += [{"role": "user", "content": "Use it in a sentence."},
                         {"role": "assistant", "content": examples[0]}]
    if int(h[3], 16) % 4 == 0:
        messages.insert(0, {"role": "system", "content": SYSTEM})
    return {"messages": messages}


def write_jsonl_atomic(path, records):
    folder = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--wordnet", default="/usr/share/wordnet", help="WordNet dict folder (default: %(default)s)")
    ap.add_argument("--train", type=int, default=3000, help="training records (default: %(default)s)")
    ap.add_argument("--held-out", type=int, default=300, help="held-out records (default: %(default)s)")
    ap.add_argument("--max-definition", type=int, default=80, help="longest definition kept, characters (default: %(default)s)")
    args = ap.parse_args()

    entries = []  # (hash, word, pos, synset)
    for pos in POS:
        index, data = (os.path.join(args.wordnet, f"{k}.{pos}") for k in ("index", "data"))
        for p in (index, data):
            if not os.path.isfile(p):
                sys.exit(f"make_instruct_data.py: {p} not found: install the Debian package wordnet-base "
                         "(scripts/setup.sh does) or pass --wordnet")
        first = read_index(index)
        synsets = read_data(data, set(first.values()))
        for word, offset in first.items():
            s = synsets.get(offset)
            if s and 0 < len(s[1]) <= args.max_definition:
                entries.append((digest(word, pos), word, pos, s))
    entries.sort()
    # The last tenth of the hash range is held out: a word is on one side only.
    # The order and the split use one hash, the record's kind and phrasing another.
    make = lambda w, p, s: record(w, p, s, digest("record", w, p))
    train = [make(w, p, s) for h, w, p, s in entries if int(h[:8], 16) < 0.9 * 16**8][:args.train]
    held = [make(w, p, s) for h, w, p, s in entries if int(h[:8], 16) >= 0.9 * 16**8][:args.held_out]
    if len(train) < args.train or len(held) < args.held_out:
        sys.exit(f"make_instruct_data.py: only {len(train)} training and {len(held)} held-out records available")
    os.makedirs(args.out, exist_ok=True)
    write_jsonl_atomic(os.path.join(args.out, "train.jsonl"), train)
    write_jsonl_atomic(os.path.join(args.out, "held-out.jsonl"), held)
    kinds = lambda rs: (sum("instruction" in r for r in rs), sum(len(r.get("messages", [])) > 3 for r in rs))
    print(f"{len(entries)} words; wrote {args.out}/train.jsonl ({len(train)} records: {kinds(train)[0]} Alpaca, "
          f"{kinds(train)[1]} with two turns) and held-out.jsonl ({len(held)} records)")


if __name__ == "__main__":
    main()
