"""Train a byte-level BPE of a new language and merge its tokens into a base tokenizer as true
merges.

    tokenizer.build(base_dir, out_dir, texts, n_new=8981, script="hangul")
    python prepare.py --out DIR [--lang ko|ja|vi]   # the same from the command line

The merged tokenizer keeps every base id and merge, then appends new tokens (ids from the base
size on) and the merges that build them. Every added merge yields a token that passes its
script's rule (SCRIPTS: Hangul for Korean...), so text without that script tokenizes exactly
as before.
Writes tokenizer.json, tokenizer_config.json and eeve_map.json (the base pieces of every new
token, for model.expand_vocab).
BPE: Sennrich et al. 2016, arXiv:1508.07909; byte-level BPE: Radford et al. 2019 (GPT-2).
"""
import hashlib
import json
import shutil
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers, trainers

REFERENCE_NEW_TOKENS = 8981  # the seed recipe: 49,152 + 8,981 = 58,133 tokens


def bytes_to_unicode() -> dict:
    """GPT-2's byte -> printable character table, used by byte-level BPE vocabularies."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:  # unprintable bytes are shifted above U+0100
            table[b] = chr(256 + extra)
            extra += 1
    return table


BYTE_OF_CHAR = {c: b for b, c in bytes_to_unicode().items()}


def token_bytes(token: str) -> bytes:
    """The raw bytes behind a byte-level token string (possibly a partial UTF-8 sequence)."""
    return bytes(BYTE_OF_CHAR[c] for c in token)


# Which new tokens may be merged, per script: a new token must hold one of these characters (or
# the cut-off start of one), so text that holds none of them tokenizes exactly as before. Each
# rule in one sentence, then its code point ranges. Add a language by adding its line.
SCRIPTS = {
    "hangul": ("holds a Hangul syllable or jamo",
               [(0x1100, 0x11FF), (0x3130, 0x318F), (0xA960, 0xA97F), (0xAC00, 0xD7FF)]),
    "japanese": ("holds kana (full or half width) or a kanji (which Chinese text shares)",
                 [(0x3040, 0x30FF), (0x31F0, 0x31FF), (0xFF66, 0xFF9F), (0x3400, 0x4DBF),
                  (0x4E00, 0x9FFF), (0x3005, 0x3007)]),
    "vietnamese": ("holds a letter with a Vietnamese diacritic (U+1EA0-U+1EF9, ă â đ ê ô ơ ư ĩ "
                   "ũ, or à á ã è é ì í ò ó õ ù ú ý, which French, Spanish and Portuguese share)",
                   [(0x1EA0, 0x1EF9), (0x0102, 0x0103), (0x0110, 0x0111), (0x0128, 0x0129),
                    (0x0168, 0x0169), (0x01A0, 0x01A1), (0x01AF, 0x01B0),
                    *[(c, c) for c in map(ord, "ÀÁÂÃÈÉÊÌÍÒÓÔÕÙÚÝàáâãèéêìíòóôõùúý")]]),
    "thai": ("holds a Thai character", [(0x0E00, 0x0E7F)]),
    "devanagari": ("holds a Devanagari character", [(0x0900, 0x097F), (0xA8E0, 0xA8FF)]),
    "cyrillic": ("holds a Cyrillic letter", [(0x0400, 0x052F)]),
}
SURROGATES = (0xD800, 0xDFFF)  # never in valid UTF-8, so a prefix may cover them


def holds_script(raw: bytes, script: str = "hangul") -> bool:
    """Whether these bytes can only occur in text that contains the script.

    True if a whole character of it is inside, or if the bytes end in the start of a character
    whose every possible completion lies in the script (EB alone is always U+B000-U+BFFF,
    Hangul; EA alone may begin Yi, so it does not count)."""
    ranges = SCRIPTS[script][1]
    text = raw.decode("utf-8", errors="ignore")
    if any(lo <= ord(ch) <= hi for ch in text for lo, hi in ranges):
        return True
    for back in range(1, 4):  # a trailing, unfinished character of 2 to 4 bytes
        prefix = raw[-back:]
        lead = prefix[0] if len(prefix) == back else 0
        size = 2 if 0xC0 <= lead < 0xE0 else 3 if 0xE0 <= lead < 0xF0 else 4 if lead >= 0xF0 else 0
        if size > back and all(0x80 <= b < 0xC0 for b in prefix[1:]):
            value = lead & (0x7F >> size)
            for b in prefix[1:]:
                value = value << 6 | b & 0x3F
            free = 6 * (size - back)  # bits the missing continuation bytes would fill
            lo = max(value << free, {2: 0x80, 3: 0x800, 4: 0x10000}[size])  # no overlongs
            return covered(lo, (value << free) | ((1 << free) - 1), [*ranges, SURROGATES])
    return False


def covered(lo: int, hi: int, ranges: list) -> bool:
    """Whether every code point in lo..hi lies in one of the (inclusive) ranges."""
    for a, b in sorted(ranges):
        if a <= lo <= b:
            lo = b + 1
        if lo > hi:
            return True
    return False


def merge_pairs(tokenizer_json: dict) -> list:
    """A tokenizer.json's merges as (left, right) pairs, from either of its two formats."""
    return [tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
            for m in tokenizer_json["model"]["merges"]]


def full_vocab(tokenizer_json: dict) -> dict:
    """Token -> id for the BPE vocabulary and the added (special) tokens together."""
    return {**tokenizer_json["model"]["vocab"],
            **{t["content"]: t["id"] for t in tokenizer_json.get("added_tokens", [])}}


def bpe(word: str, ranks: dict) -> list:
    """Byte-level BPE of one pre-token: merge the lowest-ranked adjacent pair, leftmost first."""
    parts = list(word)
    while len(parts) > 1:
        i = min(range(len(parts) - 1), key=lambda j: ranks.get((parts[j], parts[j + 1]), 1 << 62))
        if (parts[i], parts[i + 1]) not in ranks:
            break
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts

# ----------------------------------------------------------------------------------------------
# Train, then merge


def train_bpe(texts, base: Tokenizer, vocab_size: int) -> Tokenizer:
    """A standalone byte-level BPE with the base's pre-tokenizer, trained on texts."""
    tok = Tokenizer(models.BPE())
    tok.normalizer, tok.pre_tokenizer = base.normalizer, base.pre_tokenizer
    tok.decoder = base.decoder
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=True,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>"])
    tok.train_from_iterator(texts, trainer)
    return tok


def merge_tokenizers(base_json: dict, standalone: Tokenizer, n_new: int,
                     script: str = "hangul"):
    """Base tokenizer.json dict + up to n_new tokens of the standalone BPE in `script`, as merges.

    Its tokens are taken in the order it learned them. For each, the merged tokenizer so far
    splits its bytes into pieces; merges joining them are appended, choosing at each step a pair
    whose join holds the script (so no added merge fires on other text) and preferring joins
    already in the vocabulary. Returns (tokenizer dict, new token strings, how many of the
    standalone BPE's tokens each test turned away)."""
    merged = json.loads(json.dumps(base_json))
    vocab, merges = merged["model"]["vocab"], merged["model"]["merges"]
    as_text = bool(merges) and isinstance(merges[0], str)  # "a b" (old format) or ["a", "b"]
    ranks = {pair: r for r, pair in enumerate(merge_pairs(merged))}
    learned = merge_pairs(json.loads(standalone.to_str()))
    learned_rank = {pair: r for r, pair in enumerate(learned)}
    new_tokens, next_id = [], max(full_vocab(merged).values()) + 1
    rejected = dict.fromkeys(("not in the script", "in the base already",
                              "unreachable by script-only merges", "over the budget"), 0)
    for pair in learned:
        target = "".join(pair)
        if len(new_tokens) >= n_new:
            break
        if target in vocab or not holds_script(token_bytes(target), script):
            rejected["in the base already" if target in vocab else "not in the script"] += 1
            continue
        plan, parts = [], bpe(target, ranks)
        while len(parts) > 1:
            joins = [j for j in range(len(parts) - 1)
                     if holds_script(token_bytes(parts[j] + parts[j + 1]), script)]
            if not joins:
                break
            j = min(joins, key=lambda j: (parts[j] + parts[j + 1] not in vocab,
                                          learned_rank.get((parts[j], parts[j + 1]), 1 << 62), j))
            plan.append((parts[j], parts[j + 1]))
            parts[j:j + 2] = [parts[j] + parts[j + 1]]
        fresh = {a + b for a, b in plan if a + b not in vocab}
        if len(parts) > 1 or len(new_tokens) + len(fresh) > n_new:  # try the next one
            rejected["unreachable by script-only merges" if len(parts) > 1
                     else "over the budget"] += 1
            continue
        for a, b in plan:
            if a + b not in vocab:
                vocab[a + b] = next_id
                new_tokens.append(a + b)
                next_id += 1
            ranks[(a, b)] = len(merges)
            merges.append(f"{a} {b}" if as_text else [a, b])
    return merged, new_tokens, rejected


def eeve_map(base_json: dict, new_tokens: list) -> list:
    """Base ids of the pieces the base tokenizer splits each new token's raw bytes into."""
    ranks = {pair: r for r, pair in enumerate(merge_pairs(base_json))}
    return [[base_json["model"]["vocab"][p] for p in bpe(t, ranks)] for t in new_tokens]


def fingerprint(tokenizer_json: dict) -> str:
    """sha256 of a vocabulary in id order: names a base."""
    vocab = sorted(tokenizer_json["model"]["vocab"].items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()[:16]


def build(base_dir, out_dir, texts, n_new: int = REFERENCE_NEW_TOKENS,
          script: str = "hangul") -> dict:
    """Train, merge and write tokenizer.json, tokenizer_config.json, eeve_map.json and
    standalone_bpe.json (the standalone BPE cut to n_new merges, for comparison) to out_dir."""
    base_dir, out_dir = Path(base_dir), Path(out_dir)
    if not (base_dir / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{base_dir} has no tokenizer.json; pass a base model folder")
    if script not in SCRIPTS:
        raise ValueError(f"unknown script {script!r}; choose one of {sorted(SCRIPTS)} or add "
                         "its Unicode blocks to tokenizer.SCRIPTS")
    base = Tokenizer.from_file(str(base_dir / "tokenizer.json"))
    base_json = json.loads(base.to_str())
    # Room for merges that are skipped (Latin words, ones the base already has).
    standalone = train_bpe(texts, base, 256 + 1 + 3 * n_new)
    merged_json, new_tokens, rejected = merge_tokenizers(base_json, standalone, n_new, script)
    if len(new_tokens) < n_new:
        raise ValueError(f"the training text yields only {len(new_tokens)} new {script} "
                         f"tokens, fewer than new_tokens={n_new}; give it more text or "
                         "ask for fewer new tokens")
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        Tokenizer.from_str(json.dumps(merged_json)).save(str(out_dir / "tokenizer.json"))
    except Exception as e:  # tokenizers reports a failed write as a bare Exception
        raise OSError(str(e)) from None
    cut = json.loads(standalone.to_str())  # its first n_new merges: the same budget
    cut["model"]["merges"] = cut["model"]["merges"][:n_new]
    cut["model"]["vocab"] = {t: i for t, i in cut["model"]["vocab"].items() if i < 257 + n_new}
    (out_dir / "standalone_bpe.json").write_text(json.dumps(cut, ensure_ascii=False))
    if (base_dir / "tokenizer_config.json").is_file():
        shutil.copy(base_dir / "tokenizer_config.json", out_dir / "tokenizer_config.json")
    emap = {"base_vocab_size": base.get_vocab_size(), "base_fingerprint": fingerprint(base_json),
            "new_tokens": new_tokens, "pieces": eeve_map(base_json, new_tokens)}
    (out_dir / "eeve_map.json").write_text(json.dumps(emap, ensure_ascii=False))
    return {"new_tokens": len(new_tokens), "vocab_size": base.get_vocab_size() + len(new_tokens),
            "rule": f"a new token {SCRIPTS[script][0]}", "rejected": rejected}
