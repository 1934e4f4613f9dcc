"""sample.py: generation from a run folder, a checkpoint or an exported folder."""
import re
import shutil
import subprocess
import sys

import pytest
import torch
from tokenizers import Tokenizer

import sample
from gguf_io import read_gguf
from helpers import ROOT, cut_short, flip_bit, utility, weights
from hf_io import from_pretrained


@pytest.mark.slow
def test_sample_script_generates_from_an_exported_folder(tiny_run):
    out = subprocess.run([sys.executable, str(ROOT / "sample.py"), str(tiny_run / "final"),
                          "--prompt", "한국어", "--max_tokens", "5", "--temperature", "0"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.startswith("한국어") and "tokens/s]" in out.stdout


@pytest.mark.slow
def test_the_utilities_take_a_run_folder_and_name_what_is_wrong(tiny_run, stopped, tmp_path):
    out = utility("sample.py", tiny_run, "--prompt", "한국어", "--max_tokens", "3",
                  "--temperature", "0")
    assert out.returncode == 0 and f"model: {tiny_run / 'final'}" in out.stdout, out.stderr
    out = utility("sample.py", stopped, "--max_tokens", "2")  # a run still in Phase 1A
    assert out.returncode == 0 and "phase1a/ckpt-000004" in out.stdout, out.stderr
    out = utility("sample.py", tiny_run, "--max_tokens=-5")
    assert out.returncode == 2 and "argument --max_tokens: -5 is below 1" in out.stderr
    out = utility("export_gguf.py", tiny_run, tmp_path / "x.gguf", "--dtype", "f32")
    assert out.returncode == 0 and (tmp_path / "x.gguf").stat().st_size > 1_000_000, out.stderr
    # a run still in Phase 1A: its newest checkpoint, with the run's merged tokenizer
    out = utility("export_gguf.py", stopped, tmp_path / "c.gguf", "--dtype", "f32")
    assert out.returncode == 0 and "phase1a/ckpt-000004" in out.stdout, out.stderr
    _, tensors, meta = read_gguf(tmp_path / "c.gguf")
    ckpt = weights(stopped / "phase1a" / "ckpt-000004")
    assert torch.equal(tensors["model.embed_tokens.weight"], ckpt["model.embed_tokens.weight"])
    assert len(meta["tokenizer.ggml.tokens"]) == 49152 + 300
    # a checkpoint whose files no longer match its manifest is refused by both, naming it
    flip_bit(stopped / "phase1a" / "ckpt-000004" / "optimizer.pt")
    for script, args in [("sample.py", [stopped]), ("export_gguf.py", [stopped, tmp_path / "d"])]:
        out = utility(script, *args)
        assert out.returncode == 1 and re.search(
            r"error: checkpoint .*ckpt-000004 is damaged \(optimizer.pt differs from what was "
            r"written", out.stderr), out.stderr
    broken = tmp_path / "broken"
    shutil.copytree(tiny_run / "final", broken)
    cut_short(broken / "model.safetensors")
    for script, args in [("sample.py", [broken]),
                         ("export_gguf.py", [broken, tmp_path / "y.gguf"])]:
        out = utility(script, *args)
        assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
        assert re.search(r"error: .*broken/model.safetensors is damaged or cut short",
                         out.stderr.splitlines()[-1])
    assert not list(tmp_path.glob("y.gguf*"))  # nor a temporary of it
    out = utility("sample.py", tmp_path)
    assert "holds no model: pass a model folder" in out.stderr


def test_sample_prints_the_greedy_continuation_of_a_model_folder(tiny_base, capsys):
    """In this process: sample.main on a model folder prints the prompt and the same tokens as
    model.generate at temperature 0, and the same text again for the same seed."""
    sample.main([str(tiny_base), "--prompt", "한국어", "--max_tokens", "3", "--temperature", "0"])
    out = capsys.readouterr().out
    tok = Tokenizer.from_file(str(tiny_base / "tokenizer.json"))
    idx = torch.tensor([tok.encode("한국어").ids])
    expected = from_pretrained(tiny_base).eval().generate(idx, 3, temperature=0, eos_ids=[0, 2])
    assert out.startswith("한국어" + tok.decode(expected[0, idx.shape[1]:].tolist()) + "\n")
    assert re.search(r"\[\d+ tokens, [\d.]+ tokens/s\]", out)
    sampled = []
    for _ in range(2):
        sample.main([str(tiny_base), "--prompt", "한국어", "--max_tokens", "4", "--seed", "3"])
        sampled.append(capsys.readouterr().out.split("\n")[0])
    assert sampled[0] == sampled[1]


def test_an_empty_or_too_long_prompt_still_generates(tiny_base, capsys):
    """An empty prompt starts from EOS (a document's start); one longer than the context keeps
    its last tokens, leaving room for the new ones, and says so: never a traceback."""
    tok = Tokenizer.from_file(str(tiny_base / "tokenizer.json"))
    eos = tok.token_to_id("<|endoftext|>")
    assert sample.prompt_ids(tok, "", 512, 8) == [eos]
    long = "한국어 문장입니다. " * 400  # thousands of tokens; the tiny base has 512 positions
    ids = sample.prompt_ids(tok, long, 512, 8)
    assert ids == tok.encode(long).ids[-504:]
    assert "it continues from the prompt's last 504 tokens" in capsys.readouterr().out
    for prompt in ("", long):
        sample.main([str(tiny_base), "--prompt", prompt, "--max_tokens", "8", "--temperature",
                     "0"])
        assert re.search(r"\[\d+ tokens, [\d.]+ tokens/s\]", capsys.readouterr().out)
