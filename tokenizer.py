"""Train a Korean byte-level BPE and merge its Hangul tokens into a base tokenizer as true merges.

    python tokenizer.py --base DIR --out DIR [--train FILES...] [--new-tokens 8981]

The merged tokenizer keeps every base id and merge, then appends new tokens (ids from the base
size on) and the merges that build them. Every added merge yields a token holding Hangul (or the
script chosen with --script), so text without it tokenizes exactly as before.
Writes tokenizer.json, tokenizer_config.json, eeve_map.json (the base pieces of every new
token, for model.expand_vocab) and report.json.
BPE: Sennrich et al. 2016, arXiv:1508.07909; byte-level BPE: Radford et al. 2019 (GPT-2).
"""
import argparse
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

from tokenizers import Tokenizer, models, trainers

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


# Unicode blocks of each script. A new token must hold one of its characters, or the cut-off
# start of one. Add a language by adding its blocks.
SCRIPTS = {
    "hangul": [(0x1100, 0x11FF), (0x3130, 0x318F), (0xA960, 0xA97F), (0xAC00, 0xD7FF)],
    "thai": [(0x0E00, 0x0E7F)],
    "devanagari": [(0x0900, 0x097F), (0xA8E0, 0xA8FF)],
    "cyrillic": [(0x0400, 0x052F)],
}
SURROGATES = (0xD800, 0xDFFF)  # never in valid UTF-8, so a prefix may cover them


def holds_script(raw: bytes, script: str = "hangul") -> bool:
    """Whether these bytes can only occur in text that contains the script.

    True if a whole character of it is inside, or if the bytes end in the start of a character
    whose every possible completion lies in the script (EB alone is always U+B000-U+BFFF,
    Hangul; EA alone may begin Yi, so it does not count)."""
    ranges = SCRIPTS[script]
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


def holds_hangul(raw: bytes) -> bool:
    return holds_script(raw, "hangul")


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


def train_korean_bpe(texts, base: Tokenizer, vocab_size: int) -> Tokenizer:
    """A standalone byte-level BPE with the base's pre-tokenizer, trained on texts."""
    from tokenizers import pre_tokenizers
    tok = Tokenizer(models.BPE())
    tok.normalizer, tok.pre_tokenizer = base.normalizer, base.pre_tokenizer
    tok.decoder = base.decoder
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=True,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>"])
    tok.train_from_iterator(texts, trainer)
    return tok


def merge_tokenizers(base_json: dict, korean: Tokenizer, n_new: int, script: str = "hangul"):
    """Base tokenizer.json dict + up to n_new tokens of `korean` in `script`, as merges.

    Korean tokens are taken in the order the Korean BPE learned them. For each, the merged
    tokenizer so far splits its bytes into pieces; merges joining them are appended, choosing at
    each step a pair whose join holds the script (so no added merge fires on other text) and
    preferring joins already in the vocabulary. Returns (tokenizer dict, new token strings)."""
    merged = json.loads(json.dumps(base_json))
    vocab, merges = merged["model"]["vocab"], merged["model"]["merges"]
    as_pair = (lambda m: tuple(m.split(" "))) if merges and isinstance(merges[0], str) else tuple
    ranks = {as_pair(m): r for r, m in enumerate(merges)}
    korean_merges = json.loads(korean.to_str())["model"]["merges"]
    korean_rank = {as_pair(m): r for r, m in enumerate(korean_merges)}
    new_tokens, next_id = [], max(max(vocab.values()),
                                  max((t["id"] for t in merged["added_tokens"]), default=0)) + 1
    for pair in map(as_pair, korean_merges):
        target = "".join(pair)
        if len(new_tokens) >= n_new or target in vocab or \
                not holds_script(token_bytes(target), script):
            continue
        plan, parts = [], bpe(target, ranks)
        while len(parts) > 1:
            joins = [j for j in range(len(parts) - 1)
                     if holds_script(token_bytes(parts[j] + parts[j + 1]), script)]
            if not joins:
                break
            j = min(joins, key=lambda j: (parts[j] + parts[j + 1] not in vocab,
                                          korean_rank.get((parts[j], parts[j + 1]), 1 << 62), j))
            plan.append((parts[j], parts[j + 1]))
            parts[j:j + 2] = [parts[j] + parts[j + 1]]
        fresh = {a + b for a, b in plan if a + b not in vocab}
        if len(parts) > 1 or len(new_tokens) + len(fresh) > n_new:
            continue  # unreachable with script-only merges, or over budget: try the next one
        for a, b in plan:
            if a + b not in vocab:
                vocab[a + b] = next_id
                new_tokens.append(a + b)
                next_id += 1
            ranks[(a, b)] = len(merges)
            merges.append([a, b] if as_pair is tuple else f"{a} {b}")
    return merged, new_tokens


def eeve_map(base_json: dict, new_tokens: list) -> list:
    """Base ids of the pieces the base tokenizer splits each new token's raw bytes into."""
    vocab, merges = base_json["model"]["vocab"], base_json["model"]["merges"]
    ranks = {(tuple(m.split(" ")) if isinstance(m, str) else tuple(m)): r
             for r, m in enumerate(merges)}
    return [[vocab[p] for p in bpe(t, ranks)] for t in new_tokens]


def fingerprint(tokenizer_json: dict, n_tokens: int = 0) -> str:
    """sha256 of the first n_tokens entries of a vocabulary (all when 0): names a base."""
    vocab = sorted(tokenizer_json["model"]["vocab"].items(), key=lambda kv: kv[1])
    vocab = vocab[:n_tokens] if n_tokens else vocab
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()[:16]


def build(base_dir, out_dir, texts, n_new: int = REFERENCE_NEW_TOKENS, eval_texts=None,
          script: str = "hangul") -> dict:
    """Train, merge and write the merged tokenizer, EEVE map and report into out_dir."""
    base_dir, out_dir = Path(base_dir), Path(out_dir)
    if not (base_dir / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{base_dir} has no tokenizer.json; pass a base model folder")
    base = Tokenizer.from_file(str(base_dir / "tokenizer.json"))
    base_json = json.loads(base.to_str())
    t0 = time.time()
    # Room for Korean merges that are skipped (Latin words, ones the base already has).
    korean = train_korean_bpe(texts, base, 256 + 1 + 3 * n_new)
    if script not in SCRIPTS:
        raise ValueError(f"unknown script {script!r}; choose one of {sorted(SCRIPTS)} or add "
                         "its Unicode blocks to tokenizer.SCRIPTS")
    merged_json, new_tokens = merge_tokenizers(base_json, korean, n_new, script)
    if len(new_tokens) < n_new:
        raise ValueError(f"the training text yields only {len(new_tokens)} new {script} "
                         f"tokens, fewer than new_tokens={n_new}; give it more text or "
                         "ask for fewer new tokens")
    out_dir.mkdir(parents=True, exist_ok=True)
    Tokenizer.from_str(json.dumps(merged_json)).save(str(out_dir / "tokenizer.json"))
    standalone = json.loads(korean.to_str())  # its first n_new merges: the same budget
    standalone["model"]["merges"] = standalone["model"]["merges"][:n_new]
    keep = 257 + n_new
    standalone["model"]["vocab"] = {t: i for t, i in standalone["model"]["vocab"].items()
                                    if i < keep}
    (out_dir / "korean_bpe.json").write_text(json.dumps(standalone, ensure_ascii=False))
    if (base_dir / "tokenizer_config.json").is_file():
        shutil.copy(base_dir / "tokenizer_config.json", out_dir / "tokenizer_config.json")
    base_size = base.get_vocab_size()
    emap = {"base_vocab_size": base_size, "base_fingerprint": fingerprint(base_json),
            "new_tokens": new_tokens, "pieces": eeve_map(base_json, new_tokens)}
    (out_dir / "eeve_map.json").write_text(json.dumps(emap, ensure_ascii=False))
    report = {"new_tokens": len(new_tokens), "vocab_size": base_size + len(new_tokens),
              "train_seconds": round(time.time() - t0, 1)}
    if eval_texts:
        report.update(compare(base, korean_bpe_tokenizer(out_dir), Tokenizer.from_file(
            str(out_dir / "tokenizer.json")), eval_texts))
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    return report


def korean_bpe_tokenizer(out_dir: Path) -> Tokenizer:
    return Tokenizer.from_file(str(Path(out_dir) / "korean_bpe.json"))

# ----------------------------------------------------------------------------------------------
# Report


def stats(tok: Tokenizer, texts: list) -> dict:
    """Characters and bytes per token, and the share of tokens that are partial characters."""
    encodings = tok.encode_batch(texts)
    n_tokens = sum(len(e.ids) for e in encodings)
    partial = sum(1 for e in encodings for t in e.tokens if not _whole_utf8(t))
    return {"chars_per_token": sum(map(len, texts)) / max(n_tokens, 1),
            "bytes_per_token": sum(len(t.encode()) for t in texts) / max(n_tokens, 1),
            "byte_fallback_share": partial / max(n_tokens, 1), "tokens": n_tokens}


def _whole_utf8(token: str) -> bool:
    try:
        token_bytes(token).decode("utf-8")
        return True
    except (UnicodeDecodeError, KeyError):  # KeyError: a special token, not byte-level
        return True if token.startswith("<|") else False


def encode_speed(tok: Tokenizer, texts: list, repeat: int = 3) -> float:
    """Tokens per second of encode_batch on texts, best of `repeat` runs."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        n = sum(len(e.ids) for e in tok.encode_batch(texts))
        best = min(best, time.perf_counter() - t0)
    return n / best


def compare(base: Tokenizer, korean: Tokenizer, merged: Tokenizer, eval_texts: dict) -> dict:
    """Per language: stats of the base, standalone Korean and merged tokenizers, and speeds."""
    out = {}
    for lang, texts in eval_texts.items():
        out[lang] = {name: stats(tok, texts) for name, tok in
                     (("base", base), ("korean", korean), ("merged", merged))}
        out[lang]["encode_tokens_per_s"] = {"base": encode_speed(base, texts),
                                            "merged": encode_speed(merged, texts)}
    return out


def print_report(report: dict):
    print(f"{'text':<4} {'tokenizer':<9} {'chars/tok':>9} {'bytes/tok':>9} {'partial':>8}")
    for lang, rows in report.items():
        if not isinstance(rows, dict) or "base" not in rows:
            continue
        for name in ("base", "korean", "merged"):
            r = rows[name]
            print(f"{lang:<4} {name:<9} {r['chars_per_token']:9.3f} {r['bytes_per_token']:9.3f} "
                  f"{r['byte_fallback_share']:8.1%}")
        speed = rows["encode_tokens_per_s"]
        print(f"{lang:<4} encode tokens/s: base {speed['base']:,.0f}, "
              f"merged {speed['merged']:,.0f}")
    if "ko" in report:
        ko = report["ko"]
        gain = ko["merged"]["chars_per_token"] / ko["base"]["chars_per_token"]
        share = ko["merged"]["chars_per_token"] / ko["korean"]["chars_per_token"]
        print(f"Korean: {gain:.2f}x fewer tokens than base; merged reaches {share:.1%} of the "
              "standalone Korean BPE's compression")


def main(argv=None):
    import data
    from convert_gguf import OFFLINE_BASE, resolve_base
    p = argparse.ArgumentParser(description="Train a Korean BPE and merge it into a base.")
    p.add_argument("--base", default=OFFLINE_BASE, help="base model folder, hub id or GGUF")
    p.add_argument("--out", required=True, help="folder for the merged tokenizer")
    p.add_argument("--train", nargs="*", help="Korean text files (default: the bundled corpus)")
    p.add_argument("--eval", nargs="*", help="held-out Korean files for the report")
    p.add_argument("--new-tokens", type=int, default=REFERENCE_NEW_TOKENS)
    p.add_argument("--script", default="hangul", choices=sorted(SCRIPTS))
    args = p.parse_args(argv)
    try:
        train = data.iter_texts(args.train or [data.BUNDLED["ko_train"]], progress=True)
        evals = {"ko": list(data.iter_texts(args.eval or [data.BUNDLED["ko_eval"]])),
                 "en": list(data.iter_texts([data.BUNDLED["en_eval"]]))}
        report = build(resolve_base(args.base), args.out, train, args.new_tokens, evals,
                       args.script)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    print_report(report)
    print(f"wrote {args.out}/tokenizer.json, eeve_map.json, report.json")


if __name__ == "__main__":
    main()
