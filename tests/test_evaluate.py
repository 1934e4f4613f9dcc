"""evaluate.py: bits per byte, each document from its own start, and the fp16 headroom watch."""
import math

import pytest
import torch
import torch.nn.functional as F

import evaluate
from helpers import PARAGRAPH
from loss import IGNORE_INDEX


def test_the_watch_reports_each_layers_fp16_headroom(base_model, base_tok):
    headroom = []
    texts = [PARAGRAPH]
    evaluate.evaluate(base_model, base_tok, {"en": texts}, 64, torch.device("cpu"),
                      torch.autocast("cpu", enabled=False), headroom=headroom)
    assert len(headroom) == base_model.cfg.n_layers and all(0 < p < 1 for p in headroom)
    # by hand: the largest |q|, |k|, |v|, |gate|, |up| of layer 0 over the same windows
    peaks = []
    hooks = [getattr(m, n).register_forward_hook(lambda mod, i, o: peaks.append(o.abs().max()))
             for m, names in ((base_model.layers[0].self_attn, "q_proj k_proj v_proj"),
                              (base_model.layers[0].mlp, "gate_proj up_proj"))
             for n in names.split()]
    evaluate.bits_per_byte(base_model, base_tok, texts, 64, torch.device("cpu"),
                           torch.autocast("cpu", enabled=False))
    for h in hooks:
        h.remove()
    assert headroom[0] == pytest.approx(float(max(peaks)) / 65504, rel=1e-6)


def test_bits_per_byte_scores_each_document_from_its_own_start(base_model, base_tok):
    """By hand: the summed loss of [EOS] + each document's tokens, over the texts' bytes."""
    texts = ["The cat sat on the mat.", "한국어 문장 하나.", "A third, slightly longer text."]
    total = 0.0
    for text in texts:
        ids = torch.tensor([[0] + base_tok.encode(text).ids])
        with torch.no_grad():
            logits = base_model(ids[:, :-1])
        total += F.cross_entropy(logits[0], ids[0, 1:], reduction="sum").item()
    expected = total / math.log(2) / sum(len(t.encode()) for t in texts)
    got = evaluate.bits_per_byte(base_model, base_tok, texts, 64, torch.device("cpu"),
                                 torch.autocast("cpu", enabled=False))
    assert got == pytest.approx(expected, rel=1e-5)


def test_a_long_document_is_scored_in_strided_windows(base_model, base_tok):
    """By hand for a 137-token document at seq_len 32, stride 16: every token once, each with
    at least 16 tokens of context (but in the first window)."""
    text = PARAGRAPH + " " + PARAGRAPH
    ids = [0] + base_tok.encode(text).ids
    assert len(ids) == 137
    total = 0.0
    for start, end, first in [(0, 33, 1), (16, 49, 33), (32, 65, 49), (48, 81, 65),
                              (64, 97, 81), (80, 113, 97), (96, 129, 113), (104, 137, 129)]:
        x = torch.tensor([ids[start:end]])
        with torch.no_grad():
            logits = base_model(x[:, :-1])[0]
        y = x[0, 1:].clone()
        y[:first - start - 1] = IGNORE_INDEX
        total += F.cross_entropy(logits, y, reduction="sum", ignore_index=IGNORE_INDEX).item()
    got = evaluate.bits_per_byte(base_model, base_tok, [text], 32, torch.device("cpu"),
                                 torch.autocast("cpu", enabled=False), stride=16)
    assert got == pytest.approx(total / math.log(2) / len(text.encode()), rel=1e-5)
