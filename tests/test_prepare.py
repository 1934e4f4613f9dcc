"""prepare.py: the stages before training: the BPE's training text and the EEVE-initialised
model."""
import json
import shutil
import threading
from types import SimpleNamespace

import pytest
import torch

import bori
import data
from helpers import tiny_flags, weights


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
                      eval_en=data.BUNDLED["en_eval"], tokenizer_bytes=0)
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


@pytest.mark.slow
def test_a_padded_base_gets_its_new_rows_after_its_tokens(tmp_path, tiny_base, prepared,
                                                          monkeypatch):
    """A base with 64 rows past its tokenizer's 49,152 tokens (padding no token reaches): the
    merged tokenizer numbers its new tokens from 49,152, so the init stage drops the padding
    and appends the new rows there: the same init as the unpadded base's, tensor for tensor."""
    from errors import EXIT_INTERRUPTED, TrainingStopped
    from hf_io import save_pretrained
    from model import Llama, preset
    padded = tmp_path / "padded_base"
    shutil.copytree(tiny_base, padded)
    model = Llama(preset("tiny", vocab_size=49152 + 64, max_seq_len=512))
    state = weights(tiny_base)
    with torch.no_grad():
        for name, p in model.named_parameters():
            key = name if name.startswith("lm_head") else "model." + name
            src = state[key]
            p[:src.shape[0]] = src  # the padding rows keep their random init
    save_pretrained(model, padded, bos_token_id=1, eos_token_id=2)

    def stop_before_training(*args, **kwargs):
        raise TrainingStopped("the stages before training end here")
    monkeypatch.setattr(bori, "run_phase", stop_before_training)
    out = tmp_path / "run"
    assert bori.main(tiny_flags(out, padded)) == EXIT_INTERRUPTED
    ours, reference = weights(out / "init"), weights(prepared / "init")
    assert ours["model.embed_tokens.weight"].shape[0] == 49152 + 300
    assert ours.keys() == reference.keys()
    for key in reference:
        assert torch.equal(ours[key], reference[key]), key
