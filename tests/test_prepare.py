"""prepare.py: the stages before training: the BPE's training text and the EEVE-initialised
model."""
import json
import threading
from types import SimpleNamespace

import pytest
import torch

import bori
from helpers import weights


def test_tokenizer_bytes_is_honoured_inside_a_document(tmp_path):

    import prepare
    (tmp_path / "one.txt").write_text("가나다라 " * 100_000 + "\n")  # 1.3 MB, one document
    cfg = bori.Config(tokenizer_data=str(tmp_path / "one.txt"), data_new="", text_field="text",
                      tokenizer_bytes=10_000)
    run = SimpleNamespace(cfg=cfg, check_stop=lambda before: None, stop=threading.Event(),
                          corpora=bori.sources(cfg), held_out=frozenset())
    got = "".join(prepare.bpe_training_text(run))
    assert 9_997 <= len(got.encode()) <= 10_000


def test_the_bpe_never_reads_held_out_text(tmp_path):
    """The BPE is trained from data_new; when eval_new reads the same text (spelled another
    way here), the held-out documents are left out of the BPE's text too."""
    import prepare
    texts = [f"문서 {i}: " + "가나다라 " * (3 + i) for i in range(30)]
    path = tmp_path / "ko.jsonl"
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts))
    cfg = bori.Config(data_new=f"{path}#text", eval_new=str(tmp_path / "." / "ko.jsonl"),
                      eval_en=str(path), tokenizer_bytes=0)
    evals, held_out = prepare.eval_sets(bori.sources(cfg), eval_bytes=400, text_field="text")
    assert 0 < len(evals["ko"]) < len(texts)
    run = SimpleNamespace(cfg=cfg, check_stop=lambda before: None, corpora=bori.sources(cfg),
                          held_out=held_out)
    got = list(prepare.bpe_training_text(run))
    assert got == texts[len(evals["ko"]):]  # everything else, in order, and nothing held out


@pytest.mark.slow
def test_eeve_rows_are_the_mean_of_their_pieces(tiny_run, tiny_base):
    emap = json.loads((tiny_run / "tokenizer" / "eeve_map.json").read_text())
    base = weights(tiny_base)["model.embed_tokens.weight"]
    init = weights(tiny_run / "init")["model.embed_tokens.weight"]
    assert init.shape[0] == 49152 + 300
    assert torch.equal(init[:49152], base)
    for i, pieces in enumerate(emap["pieces"]):
        expected = base[pieces].double().mean(0).float()
        assert torch.allclose(init[49152 + i], expected, atol=1e-7), i
