"""Held-out bits per byte, comparable across tokenizers, and sample completions.

bits/byte = summed next-token cross-entropy (nats) / ln 2 / UTF-8 bytes of the scored text:
a tokenizer that needs fewer tokens gains nothing by it (Gao et al. 2020, The Pile, sec. 4.1).
"""
import math

import torch

from checkpoint import all_sum
from data import EOS_TOKEN
from model import IGNORE_INDEX


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
