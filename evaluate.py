"""Held-out measurements: bits per byte, tokenizer compression, and sample completions.

bits/byte = summed next-token cross-entropy (nats) / ln 2 / UTF-8 bytes of the scored text:
a tokenizer that needs fewer tokens gains nothing by it (Gao et al. 2020, The Pile, sec. 4.1).
"""
import math
from pathlib import Path

import torch
from tokenizers import Tokenizer

from data import EOS_TOKEN
from distributed import all_sum
from loss import IGNORE_INDEX
from tokenizer import token_bytes


@torch.no_grad()
def bits_per_byte(model, tok, texts: list, seq_len: int, device, ctx, rank=0, world_size=1):
    """Bits per UTF-8 byte of texts, windows split across ranks.

    The documents are joined as in training (EOS before each one); windows of seq_len
    predictions cover every token once, and EOS targets are skipped: they are not text."""
    eos = tok.token_to_id(EOS_TOKEN)
    ids = [eos]
    for enc in tok.encode_batch(texts, add_special_tokens=False):
        ids += enc.ids + [eos]
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    was_training, total = model.training, 0.0
    model.eval()
    for start in range(0, len(ids) - 1, seq_len)[rank::world_size]:
        window = torch.tensor(ids[start:start + seq_len + 1], device=device)
        x, y = window[None, :-1], window[None, 1:].clone()
        y[y == eos] = IGNORE_INDEX
        with ctx:
            total += model(x, y, reduction="sum").item()
    model.train(was_training)
    if world_size > 1:
        total = all_sum([total], device)[0]
    return total / (math.log(2) * n_bytes)


def evaluate(model, tok, evals: dict, seq_len: int, device, ctx, rank=0, world_size=1) -> dict:
    """{'ko_bpb': ..., 'en_bpb': ...} for evals = {'ko': texts, 'en': texts}."""
    return {f"{lang}_bpb": bits_per_byte(model, tok, texts, seq_len, device, ctx, rank,
                                         world_size) for lang, texts in evals.items()}


@torch.no_grad()
def samples(model, tok, prompts: list, max_tokens: int, seed: int, device, ctx) -> list:
    """Completions of prompts (temperature 0.8, top-p 0.9, a fixed seed)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    out, was_training = [], model.training
    model.eval()
    for prompt in prompts:
        idx = torch.tensor([tok.encode(prompt).ids], device=device)
        with ctx:
            ids = model.generate(idx, max_tokens, temperature=0.8, top_p=0.9,
                                 eos_ids=[tok.token_to_id(EOS_TOKEN)], generator=gen)
        out.append(prompt + tok.decode(ids[0, idx.shape[1]:].tolist()))
    model.train(was_training)
    return out

# ----------------------------------------------------------------------------------------------
# Tokenizer compression


def token_stats(tok: Tokenizer, texts: list) -> dict:
    """Characters and bytes per token, and the share of tokens that are partial characters."""
    encodings = tok.encode_batch(texts)
    n_tokens = sum(len(e.ids) for e in encodings)
    partial = sum(1 for e in encodings for t in e.tokens if not whole_utf8(t))
    return {"chars_per_token": sum(map(len, texts)) / max(n_tokens, 1),
            "bytes_per_token": sum(len(t.encode()) for t in texts) / max(n_tokens, 1),
            "byte_fallback_share": partial / max(n_tokens, 1), "tokens": n_tokens}


def whole_utf8(token: str) -> bool:
    """Whether a byte-level token is whole characters (special tokens count as whole)."""
    try:
        token_bytes(token).decode("utf-8")
        return True
    except (UnicodeDecodeError, KeyError):  # KeyError: a special token, not byte-level
        return token.startswith("<|")


def tokenizer_report(base_dir, tok_dir, evals: dict) -> dict:
    """Per language: token_stats of the base, the standalone and the merged tokenizer."""
    toks = {"base": Path(base_dir) / "tokenizer.json",
            "standalone": Path(tok_dir) / "standalone_bpe.json",
            "merged": Path(tok_dir) / "tokenizer.json"}
    toks = {name: Tokenizer.from_file(str(path)) for name, path in toks.items()}
    return {lang: {name: token_stats(tok, texts) for name, tok in toks.items()}
            for lang, texts in evals.items()}


def print_tokenizer_report(report: dict):
    print(f"{'text':<4} {'tokenizer':<10} {'chars/tok':>9} {'bytes/tok':>9} {'partial':>8}")
    for lang, rows in report.items():
        for name, r in rows.items():
            print(f"{lang:<4} {name:<10} {r['chars_per_token']:9.3f} "
                  f"{r['bytes_per_token']:9.3f} {r['byte_fallback_share']:8.1%}")
    if "ko" in report:
        ko = report["ko"]
        gain = ko["merged"]["chars_per_token"] / ko["base"]["chars_per_token"]
        share = ko["merged"]["chars_per_token"] / ko["standalone"]["chars_per_token"]
        print(f"Korean: {gain:.2f}x fewer tokens than base; merged reaches {share:.1%} of the "
              "standalone BPE's compression")

