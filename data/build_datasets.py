"""Rebuild the datasets in data/ from the Debian packages they come from (see data/README.md).

    apt-get download wordnet-base debian-faq
    dpkg-deb -x wordnet-base_*.deb wn && dpkg-deb -x debian-faq_*.deb faq
    python data/build_datasets.py --wordnet wn/usr/share/wordnet \
        --faq faq/usr/share/doc/debian/FAQ/debian-faq.en.txt.gz --out data

Everything is deterministic (fixed seeds, sorted inputs): the same packages give the same files.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import random
import re
from collections import defaultdict
from pathlib import Path

POS_NAMES = {"n": "noun", "v": "verb", "a": "adjective", "s": "adjective", "r": "adverb"}
DATA_FILES = {"noun": "data.noun", "verb": "data.verb", "adjective": "data.adj", "adverb": "data.adv"}
INDEX_FILES = {"noun": "index.noun", "verb": "index.verb", "adjective": "index.adj", "adverb": "index.adv"}
CNT_POS = {"1": "noun", "2": "verb", "3": "adjective", "4": "adverb", "5": "adjective"}
# Supersense classes for the classification set: lexicographer file number -> label.
SUPERSENSES = {5: "animal", 6: "artifact", 8: "body", 13: "food", 15: "location", 18: "person", 20: "plant",
               27: "substance"}  # fmt: skip
QUESTION_TEMPLATES = (
    'What does the word "{w}" mean?',
    'Define "{w}".',
    'What is the meaning of "{w}" as a {pos}?',
    'Give a short dictionary definition of the {pos} "{w}".',
    'Explain what "{w}" means.',
)


def read_synsets(wordnet: Path, pos: str) -> dict[str, dict]:
    """offset -> {lexfile, words, definition, examples} from one data.<pos> file."""
    synsets = {}
    for line in (wordnet / DATA_FILES[pos]).read_text(encoding="utf-8").splitlines():
        if line.startswith("  "):  # licence header
            continue
        fields, _, gloss = line.partition(" | ")
        parts = fields.split()
        n_words = int(parts[3], 16)
        words = [parts[4 + 2 * i].replace("_", " ") for i in range(n_words)]
        pieces = [p.strip() for p in gloss.strip().split(";")]
        definition = pieces[0]
        examples = [p.strip('"') for p in pieces[1:] if p.startswith('"') and p.endswith('"')]
        synsets[parts[0]] = {"lexfile": int(parts[1]), "words": words, "definition": definition,
                             "examples": examples}  # fmt: skip
    return synsets


def lemma_frequencies(wordnet: Path) -> dict[tuple[str, str], int]:
    """(lemma, pos) -> summed SemCor tag count over its senses (cntlist.rev)."""
    counts: dict[tuple[str, str], int] = defaultdict(int)
    for line in (wordnet / "cntlist.rev").read_text(encoding="utf-8").splitlines():
        key, _, count = line.split()
        lemma, _, rest = key.partition("%")
        counts[(lemma, CNT_POS[rest[0]])] += int(count)
    return counts


def first_senses(wordnet: Path, pos: str) -> dict[str, str]:
    """lemma -> offset of its most frequent sense (index.<pos> lists senses by frequency)."""
    first = {}
    for line in (wordnet / INDEX_FILES[pos]).read_text(encoding="utf-8").splitlines():
        if line.startswith("  "):
            continue
        parts = line.split()
        n_synsets, n_ptrs = int(parts[2]), int(parts[3])
        offsets = parts[4 + n_ptrs + 2 :]
        if len(offsets) == n_synsets:
            first[parts[0]] = offsets[0]
    return first


def definition_answer(word: str, pos: str, synset: dict) -> str:
    text = f"{word} ({pos}): {synset['definition']}."
    if synset["examples"]:
        text += f' For example: "{synset["examples"][0]}".'
    return text


def build_definitions(wordnet: Path, n_train: int, n_val: int, seed: int) -> tuple[list, list]:
    """The most frequent lemmas (SemCor counts) with the definition of their most frequent sense."""
    freq = lemma_frequencies(wordnet)
    rows = []
    for pos in DATA_FILES:
        synsets, senses = read_synsets(wordnet, pos), first_senses(wordnet, pos)
        for lemma, offset in senses.items():
            if freq.get((lemma, pos), 0) >= 3 and lemma.isalpha() and len(lemma) > 2:
                rows.append((freq[(lemma, pos)], lemma, pos, synsets[offset]))
    rows.sort(key=lambda r: (-r[0], r[1], r[2]))
    rows = rows[: n_train + n_val]
    rng = random.Random(seed)
    rng.shuffle(rows)
    # Hold out whole lemmas (all their parts of speech), so no validation question is asked in training.
    lemmas = list(dict.fromkeys(r[1] for r in rows))
    val_lemmas, n = set(), 0
    for lemma in lemmas:
        if n >= n_val:
            break
        val_lemmas.add(lemma)
        n += sum(1 for r in rows if r[1] == lemma)
    train, val = [], []
    for _, lemma, pos, synset in rows:
        question = rng.choice(QUESTION_TEMPLATES).format(w=lemma.replace("_", " "), pos=pos)
        record = {"source": "wordnet", "messages": [
            {"role": "user", "content": question},
            {"role": "assistant", "content": definition_answer(lemma.replace("_", " "), pos, synset)}]}  # fmt: skip
        (val if lemma in val_lemmas else train).append(record)
    return train, val


def parse_faq(path: Path, max_chars: int) -> list[dict]:
    """Question/answer pairs from the plain-text Debian FAQ: 'N.M. Question' headings, indented answers."""
    lines = gzip.open(path, "rt", encoding="utf-8").read().replace("\xa0", " ").splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(r"^1\.1\. ", line) and i > 100)
    pairs, question, body = [], None, []
    for line in lines[start:] + ["0.0. END"]:
        heading = re.match(r"^(\d+)\.(\d+)\. (.+)$", line)
        if heading or (question is not None and not body and line and not line.startswith(" ")):
            if heading:
                if question is not None:
                    pairs.append((question, _answer(body, max_chars)))
                question, body = heading.group(3), []
            else:
                question += " " + line.strip()  # the heading continues on the next line
            continue
        if re.match(r"^(Chapter )?\d+\. ", line):  # a chapter title, not part of any answer
            continue
        if question is not None:
            body.append(line)
    return [{"source": "debian-faq", "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            for q, a in pairs if a]  # fmt: skip


def _answer(body: list[str], max_chars: int) -> str:
    """Whole paragraphs (re-flowed) up to max_chars; at least the first paragraph."""
    paragraphs, current = [], []
    for line in body + [""]:
        if line.strip():
            current.append(line.strip())
        elif current:
            paragraphs.append(" ".join(current))
            current = []
    text = ""
    for p in paragraphs:
        if text and len(text) + len(p) + 2 > max_chars:
            break
        text = f"{text}\n\n{p}" if text else p
    return text.replace("( https", "(https")


def build_supersenses(wordnet: Path, per_class_train: int, per_class_val: int, seed: int) -> tuple[list, list]:
    """Noun definitions labelled with their WordNet supersense (lexicographer file)."""
    by_label = defaultdict(list)
    for offset, s in sorted(read_synsets(wordnet, "noun").items()):
        label = SUPERSENSES.get(s["lexfile"])
        if label and 25 <= len(s["definition"]) <= 300:
            by_label[label].append({"text": s["definition"], "label": label})
    rng = random.Random(seed)
    train, val = [], []
    for label in sorted(by_label):
        rows = by_label[label]
        rng.shuffle(rows)
        val += rows[:per_class_val]
        train += rows[per_class_val : per_class_val + per_class_train]
    rng.shuffle(train)
    rng.shuffle(val)
    return train, val


def write_jsonl(path: Path, records: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def write_csv(path: Path, records: list[dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(records)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--wordnet", type=Path, required=True, help="directory with data.noun, index.noun, cntlist.rev")
    ap.add_argument("--faq", type=Path, required=True, help="debian-faq.en.txt.gz")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent)
    args = ap.parse_args()
    defs_train, defs_val = build_definitions(args.wordnet, n_train=3000, n_val=200, seed=0)
    faq = parse_faq(args.faq, max_chars=1200)
    random.Random(1).shuffle(faq)
    n_faq_val = len(faq) // 10
    train, val = faq[n_faq_val:] + defs_train, faq[:n_faq_val] + defs_val
    random.Random(2).shuffle(train)
    (args.out / "instruct").mkdir(parents=True, exist_ok=True)
    write_jsonl(args.out / "instruct" / "train.jsonl", train)
    write_jsonl(args.out / "instruct" / "validation.jsonl", val)
    sup_train, sup_val = build_supersenses(args.wordnet, per_class_train=250, per_class_val=40, seed=0)
    (args.out / "supersense").mkdir(parents=True, exist_ok=True)
    write_csv(args.out / "supersense" / "train.csv", sup_train)
    write_csv(args.out / "supersense" / "validation.csv", sup_val)
    print(f"instruct: {len(train)} train / {len(val)} validation ({len(faq)} FAQ pairs); "
          f"supersense: {len(sup_train)} train / {len(sup_val)} validation")  # fmt: skip


if __name__ == "__main__":
    main()
