"""gguf_io.py: GGUF in (the offline base) and out (for llama.cpp)."""
import json
import shutil

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

import final
from gguf_io import gguf_to_hf, read_gguf, write_gguf
from helpers import ENGLISH, KOREAN, weights
from hf_io import from_pretrained


@pytest.mark.slow
def test_converted_tokenizer(base_tok, base_dir):
    from gguf import GGUFReader

    from gguf_io import bundled_gguf
    assert base_tok.get_vocab_size() == 49152
    assert [base_tok.id_to_token(i) for i in range(3)] == [
        "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens = GGUFReader(str(bundled_gguf())).fields["tokenizer.ggml.tokens"].contents()
    assert all(base_tok.id_to_token(i) == t for i, t in enumerate(tokens))
    samples = ENGLISH + KOREAN + ["emoji 🙂🚀 and digits 0123456789", "  spaces\ttabs\n\nnewlines"]
    for text in samples:
        assert base_tok.decode(base_tok.encode(text).ids) == text
    # Digits are split one by one, as SmolLM2's pre-tokenizer does.
    assert base_tok.encode("2024").tokens == ["2", "0", "2", "4"]
    from transformers import AutoTokenizer
    hf_tok = AutoTokenizer.from_pretrained(base_dir)
    for text in samples:
        assert hf_tok(text)["input_ids"] == base_tok.encode(text).ids


def test_llama_cpp_permutation_is_the_inverse():
    from gguf_io import rope_permute, rope_unpermute
    w = np.arange(12 * 5, dtype=np.float32).reshape(12, 5)
    assert np.array_equal(rope_unpermute(rope_permute(w, 3), 3), w)
    # llama.cpp's layout interleaves the two rotate-half halves of each head: rows 0, 3, 1, 4...
    assert rope_permute(w, 2)[:, 0].tolist() == [0, 15, 5, 20, 10, 25, 30, 45, 35, 50, 40, 55]


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


@pytest.mark.slow
def test_gguf_q8_0_export_is_named_after_the_run_and_close_to_f16(tiny_run, tmp_path):
    f16, q8 = tmp_path / "f16.gguf", tmp_path / "q8.gguf"
    write_gguf(tiny_run / "final", f16, "f16", "bori-test")
    write_gguf(tiny_run / "final", q8, "q8_0", "bori-test")
    _, a, meta = read_gguf(f16)
    _, b, _ = read_gguf(q8)
    assert meta["general.name"] == "bori-test"
    from gguf import GGUFReader

    def matrix_bytes(path):
        return sum(int(t.n_bytes) for t in GGUFReader(str(path)).tensors if len(t.shape) == 2)
    assert matrix_bytes(q8) / matrix_bytes(f16) == pytest.approx(34 / 64)  # 34 B per 32 weights
    for key in a:  # Q8_0: 8 bits per weight, a scale per 32: within half a step of the block max
        assert (a[key] - b[key]).abs().max() <= a[key].abs().max() / 127 + 1e-3, key
    assert_q8_0_blocks(weights(tiny_run / "final"), b)
    _, run_gguf, run_meta = read_gguf(tiny_run / "final.gguf")
    assert run_meta["general.name"] == f"bori-{tiny_run.name}"


def assert_q8_0_blocks(original: dict, quantized: dict):
    """Q8_0 keeps each block of 32 consecutive weights of a row as int8 times one fp16 scale
    d = max|x| / 127: every weight within d/2 (the int8 rounding) plus 127 times the fp16
    rounding of d; 1-D tensors (norms) stay f32, exact."""
    for key, x in original.items():
        if key == "lm_head.weight" and key not in quantized:
            continue  # tied: stored once, as the embedding
        y = quantized[key]
        if x.ndim == 1:
            assert torch.equal(x, y), key
            continue
        blocks, got = x.double().reshape(-1, 32), y.double().reshape(-1, 32)
        d = blocks.abs().amax(dim=1, keepdim=True) / 127
        d16 = d.half().double()
        bound = d / 2 + 127 * (d - d16).abs() + 1e-6 * d  # + float32 arithmetic
        assert ((blocks - got).abs() <= bound).all(), key
        assert (blocks - got).abs().max() > 0, key  # really quantized


@pytest.mark.slow
def test_a_run_with_gguf_type_q8_0_exports_q8_0(tiny_run, tmp_path):
    """final.export_run with gguf_type=q8_0 in config.json (as --gguf_type=q8_0 leaves it):
    every matrix Q8_0 within its per-block bound, the norms F32."""
    from gguf import GGMLQuantizationType, GGUFReader
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("final.gguf", ".lock"))
    cfg = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**cfg, "gguf_type": "q8_0"}))
    final.export_run(run / "phase1b" / "model", run)
    types = {len(t.shape): set() for t in GGUFReader(str(run / "final.gguf")).tensors}
    for t in GGUFReader(str(run / "final.gguf")).tensors:
        types[len(t.shape)].add(t.tensor_type)
    assert types == {2: {GGMLQuantizationType.Q8_0}, 1: {GGMLQuantizationType.F32}}
    _, tensors, meta = read_gguf(run / "final.gguf")
    assert meta["general.name"] == "bori-run"
    assert_q8_0_blocks(weights(run / "final"), tensors)
