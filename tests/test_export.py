"""Where the model goes next: GGUF round trip, the model card against metrics.jsonl, plots,
sample.py."""
import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import ENGLISH, KOREAN, ROOT, logged, weights
from tokenizers import Tokenizer

from gguf_io import gguf_to_hf, read_gguf, write_gguf
from hf_io import from_pretrained


@pytest.mark.slow
def test_gguf_round_trip_f32_is_exact(tiny_run, tmp_path):
    folder = tiny_run / "final"
    path = write_gguf(folder, tmp_path / "m.gguf", "f32")
    hf, tensors, meta = read_gguf(path)  # un-permutes Q and K
    ours = weights(folder)
    assert set(tensors) == set(ours)
    for key, value in ours.items():
        assert torch.equal(tensors[key], value), key
    tok = json.loads((folder / "tokenizer.json").read_text())
    assert meta["tokenizer.ggml.tokens"][49152:] == \
        sorted(tok["model"]["vocab"], key=tok["model"]["vocab"].get)[49152:]
    assert meta["tokenizer.ggml.merges"] == [" ".join(m) for m in tok["model"]["merges"]]
    assert hf["vocab_size"] == len(meta["tokenizer.ggml.tokens"]) == 49452
    # and convert_gguf.py turns our export back into a folder with the same logits
    back = gguf_to_hf(path, tmp_path / "back")
    a, b = from_pretrained(folder).eval(), from_pretrained(back).eval()
    merged, again = (Tokenizer.from_file(str(f / "tokenizer.json")) for f in (folder, back))
    for text in ENGLISH + KOREAN:
        assert again.encode(text).ids == merged.encode(text).ids
        idx = torch.tensor([merged.encode(text).ids])
        with torch.no_grad():
            assert torch.equal(a(idx), b(idx))


@pytest.mark.slow
def test_gguf_f16_export_rounds_only_matrices(tiny_run, tmp_path):
    path = write_gguf(tiny_run / "final", tmp_path / "m16.gguf", "f16")
    _, tensors, _ = read_gguf(path)
    for key, value in weights(tiny_run / "final").items():
        expected = value.half().float() if value.ndim == 2 else value
        assert torch.equal(tensors[key], expected), key


def test_llama_cpp_permutation_is_the_inverse():
    from gguf_io import rope_permute, rope_unpermute
    w = np.arange(12 * 5, dtype=np.float32).reshape(12, 5)
    assert np.array_equal(rope_unpermute(rope_permute(w, 3), 3), w)
    # llama.cpp's layout interleaves the two rotate-half halves of each head: rows 0, 3, 1, 4...
    assert rope_permute(w, 2)[:, 0].tolist() == [0, 15, 5, 20, 10, 25, 30, 45, 35, 50, 40, 55]


@pytest.mark.slow
def test_model_card_numbers_match_metrics(tiny_run):
    card = (tiny_run / "final" / "README.md").read_text()
    recs = logged(tiny_run)
    base = next(r for r in recs if r["kind"] == "eval" and r["phase"] == "base")
    last = {p: [r for r in recs if r["kind"] == "eval" and r["phase"] == p][-1]
            for p in ("1a", "1b")}
    row = re.search(r"\| Korean \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|", card).groups()
    assert [float(v) for v in row] == [round(base["ko_bpb"], 4), round(last["1a"]["ko_bpb"], 4),
                                       round(last["1b"]["ko_bpb"], 4)]
    row = re.search(r"\| English \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|", card).groups()
    assert float(row[2]) == round(last["1b"]["en_bpb"], 4)
    train_1b = [r for r in recs if r["kind"] == "train" and r["phase"] == "1b"]
    assert f"| {len(train_1b)} | {train_1b[-1]['tokens']:,} |" in card
    assert "license: apache-2.0" in card and "## Use" in card  # the template: test_ux
    report = json.loads((tiny_run / "tokenizer" / "report.json").read_text())
    assert f"{report['ko']['merged']['chars_per_token']:.3f} characters per token" in card


@pytest.mark.slow
def test_run_leaves_plots_and_gguf(tiny_run):
    png = tiny_run / "plots" / "training.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    assert (tiny_run / "final.gguf").stat().st_size > 1_000_000


@pytest.mark.slow
def test_sample_script_generates_from_an_exported_folder(tiny_run):
    out = subprocess.run([sys.executable, str(ROOT / "sample.py"), str(tiny_run / "final"),
                          "--prompt", "한국어", "--max_tokens", "5", "--temperature", "0"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.startswith("한국어") and "tokens/s]" in out.stdout
