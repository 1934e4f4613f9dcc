"""Held-out measurements: bits per byte, tokenizer compression, and sample completions.

bits/byte = summed next-token cross-entropy (nats) / ln 2 / UTF-8 bytes of the scored text:
a tokenizer that needs fewer tokens gains nothing by it (Gao et al. 2020, The Pile, sec. 4.1).
"""
import math
from contextlib import contextmanager
from pathlib import Path

import torch
from tokenizers import Tokenizer

from data import EOS_TOKEN, language_name
from distributed import all_max, all_sum
from loss import IGNORE_INDEX
from tokenizer import token_bytes


def windows(n_tokens: int, seq_len: int, stride: int) -> list:
    """(start, end, first scored) windows over a document of n_tokens (its EOS start
    included): each predicts the tokens from `first scored` to end, every token once, and each
    prediction sees at least seq_len - stride tokens of context when the document has them."""
    out, scored = [], 1  # token 0 is the EOS the document starts from: not predicted
    while scored < n_tokens:
        # the first window: seq_len + 1 tokens (seq_len inputs); the next ones move by stride
        end = min(scored + stride if out else seq_len + 1, n_tokens)
        out.append((max(0, end - seq_len - 1), end, scored))
        scored = end
    return out


@torch.no_grad()
def bits_per_byte(model, tok, texts: list, seq_len: int, device, ctx, rank=0, world_size=1,
                  stride: int = 0):
    """Bits per UTF-8 byte of texts, each document scored from its own start.

    A document is [EOS] + its tokens, as in training, where documents follow an EOS, and no
    document sees another's tokens. One longer than seq_len is scored in windows of seq_len
    tokens that move on by stride (default seq_len // 2), each scoring only its new tokens:
    every token is predicted once with at least seq_len - stride tokens of context (the
    sliding window of Press et al. 2021, arXiv:2108.12409). Windows are split across ranks."""
    eos, stride = tok.token_to_id(EOS_TOKEN), stride or max(seq_len // 2, 1)
    docs = [[eos] + enc.ids for enc in tok.encode_batch(texts, add_special_tokens=False)]
    jobs = [(d, *w) for d, ids in enumerate(docs) for w in windows(len(ids), seq_len, stride)]
    was_training, total = model.training, 0.0
    model.eval()
    # windows, not documents, go round the ranks: one long document keeps every rank busy
    for d, start, end, first in jobs[rank::world_size]:
        window = torch.tensor(docs[d][start:end], device=device)
        x, y = window[None, :-1], window[None, 1:].clone()
        y[:, :first - start - 1] = IGNORE_INDEX  # predicted by the window before
        y.masked_fill_(y == eos, IGNORE_INDEX)  # an EOS written in the text is not text
        with ctx:
            total += model(x, y, reduction="sum").item()  # nats; the windows' sizes differ
    model.train(was_training)
    if world_size > 1:
        total = all_sum([total], device)[0]
    return total / (math.log(2) * sum(len(t.encode("utf-8")) for t in texts))  # EOS: no bytes


# ----------------------------------------------------------------------------------------------
# Grammar probes (probes.py): minimal pairs scored as lm-evaluation-harness scores them


@torch.no_grad()
def probe_loglikelihoods(model, tok, pairs: list, device, ctx, batch_size: int = 64) -> list:
    """[(log p(good | context), log p(bad | context))] in nats, summed over each continuation's
    tokens, as lm-evaluation-harness computes them: the context is encode(context), the
    continuation what follows its first len(encode(context)) tokens in encode(context + side).
    (Running the context once into a KV cache for both sides was no faster on 2 CPU cores:
    batches by context length are smaller, and each forward pass has its fixed cost.)"""
    def encode(text: str) -> list:
        return tok.encode(text, add_special_tokens=False).ids
    rows = []  # (pair, side, ids, first scored position)
    for i, pair in enumerate(pairs):
        context = encode(pair.context)
        for side, continuation in enumerate((pair.good, pair.bad)):
            ids = context + encode(pair.context + continuation)[len(context):]
            if len(ids) == len(context):  # nothing of the side would be scored
                raise ValueError(f"probe pair {i}: a continuation has no token of its own "
                                 f"after its context ({pair.context[-20:]!r})")
            rows.append((i, side, ids, len(context)))
    rows.sort(key=lambda r: len(r[2]))  # batches of like lengths: little padding
    lls = [[0.0, 0.0] for _ in pairs]
    was_training = model.training
    model.eval()
    for b in range(0, len(rows), batch_size):
        batch = rows[b:b + batch_size]
        T = max(len(ids) for _, _, ids, _ in batch) - 1
        x = torch.zeros(len(batch), T, dtype=torch.long)
        y = torch.full((len(batch), T), IGNORE_INDEX, dtype=torch.long)
        for r, (_, _, ids, n_context) in enumerate(batch):
            x[r, :len(ids) - 1] = torch.tensor(ids[:-1])
            y[r, n_context - 1:len(ids) - 1] = torch.tensor(ids[n_context:])  # right-padded
        x, y = x.to(device), y.to(device)
        with ctx:
            h = model.hidden(x)
        scored = y != IGNORE_INDEX
        # log-softmax only where a continuation token is predicted: a few rows of logits
        logits = model.lm_head(h[scored])[..., :model.cfg.vocab_size].float()
        lp = logits.log_softmax(-1).gather(1, y[scored][:, None])[:, 0].double()
        sums = torch.zeros(len(batch), dtype=torch.float64, device=device)
        sums.index_add_(0, scored.nonzero()[:, 0], lp)
        for (i, side, _, _), ll in zip(batch, sums.tolist()):
            lls[i][side] = ll
    model.train(was_training)
    return [tuple(ll) for ll in lls]


def probe_accuracy(lls: list, pairs: list) -> dict:
    """lm-evaluation-harness's acc and acc_norm for pairs scored by probe_loglikelihoods: the
    share of pairs whose original wins, by summed log-probability and by log-probability per
    character of the continuation. A tie goes to the choice listed first (the harness's argmax),
    the original in half of the pairs (Pair.good_first): a model that cannot tell scores 50%."""
    def wins(good: float, bad: float, pair) -> bool:
        return good > bad or (good == bad and pair.good_first)
    acc = sum(wins(good, bad, p) for (good, bad), p in zip(lls, pairs))
    norm = sum(wins(good / len(p.good), bad / len(p.bad), p) for (good, bad), p in zip(lls, pairs))
    return {"acc": acc / max(len(pairs), 1), "acc_norm": norm / max(len(pairs), 1),
            "n": len(pairs)}


FP16_MAX = 65504.0  # the largest finite float16


@contextmanager
def watch_fp16_headroom(model):
    """Within the block, note per layer the largest |activation| that stays fp16 under autocast:
    the outputs of q, k, v and the MLP's gate and up projections (what is added to the residual
    stream is kept in range by model.residual_linear). Forward hooks, so the model stays only a
    model; yields a list filled on leaving with each layer's peak / fp16's max."""
    peaks = [[] for _ in model.layers]

    def note(layer: int):
        def hook(module, inputs, output):
            peaks[layer].append(output.detach().abs().amax().float())  # on device: no sync
        return hook
    handles = [getattr(part, name).register_forward_hook(note(i))
               for i, block in enumerate(model.layers)
               for part, names in ((block.self_attn, ("q_proj", "k_proj", "v_proj")),
                                   (block.mlp, ("gate_proj", "up_proj")))
               for name in names]
    fractions = []
    try:
        yield fractions
    finally:
        for handle in handles:
            handle.remove()
        fractions += [float(torch.stack(p).max()) / FP16_MAX if p else 0.0 for p in peaks]


def evaluate(model, tok, evals: dict, seq_len: int, device, ctx, rank=0, world_size=1,
             headroom: list = None, probes: dict = None) -> dict:
    """{'ko_bpb': ..., 'en_bpb': ...} for evals = {'ko': texts, 'en': texts} (keyed by language
    code), and for each grammar probe {'ko_particles_acc': ..., '..._acc_norm': ...}. A list
    passed as headroom is filled with each layer's peak fp16 activation as a fraction of fp16's
    maximum."""
    with watch_fp16_headroom(model) as fractions:
        scores = {f"{lang}_bpb": bits_per_byte(model, tok, texts, seq_len=seq_len, device=device,
                                               ctx=ctx, rank=rank, world_size=world_size)
                  for lang, texts in evals.items()}
    if headroom is not None:
        headroom += all_max(fractions, device) if world_size > 1 else fractions
    for name, pairs in (probes or {}).items():  # pairs go round the ranks; counts are summed
        mine = pairs[rank::world_size]
        acc = probe_accuracy(probe_loglikelihoods(model, tok, mine, device, ctx), mine)
        right, right_norm = round(acc["acc"] * acc["n"]), round(acc["acc_norm"] * acc["n"])
        if world_size > 1:  # the base line is scored on rank 0 alone: no collective then
            right, right_norm = all_sum([right, right_norm], device)
        scores |= {f"{name}_acc": right / max(len(pairs), 1),
                   f"{name}_acc_norm": right_norm / max(len(pairs), 1)}
    return scores


@torch.no_grad()
def samples(model, tok, prompts: list, max_tokens: int, seed: int, device, ctx) -> list:
    """Completions of prompts (temperature 0.8, top-p 0.9, a fixed seed)."""
    # its own generator: sampling leaves the global RNG, and so an exact resume, untouched
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
    """tokenizer_report as a table, then each new language's gain over the base tokenizer."""
    print(f"{'text':<4} {'tokenizer':<10} {'chars/tok':>9} {'bytes/tok':>9} {'partial':>8}")
    for lang, rows in report.items():
        for name, r in rows.items():
            print(f"{lang:<4} {name:<10} {r['chars_per_token']:9.3f} "
                  f"{r['bytes_per_token']:9.3f} {r['byte_fallback_share']:8.1%}")
    for lang, rows in report.items():
        if lang != "en":
            gain = rows["merged"]["chars_per_token"] / rows["base"]["chars_per_token"]
            share = rows["merged"]["chars_per_token"] / rows["standalone"]["chars_per_token"]
            print(f"{language_name(lang)}: {gain:.2f}x fewer tokens than base; merged reaches "
                  f"{share:.1%} of the standalone BPE's compression")
