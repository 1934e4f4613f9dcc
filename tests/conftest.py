"""Shared fixtures: the real SmolLM2-135M base (converted once per session from the offline GGUF),
the reference tokenizer merge, a tiny random base and one uninterrupted tiny run."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import tiny_flags
from tokenizers import Tokenizer

import bori
import data
import tokenizer
from gguf_io import OFFLINE_BASE
from inputs import resolve_base
from hf_io import from_pretrained, save_pretrained
from model import Llama, preset

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def base_dir() -> Path:
    return resolve_base(OFFLINE_BASE)


@pytest.fixture(scope="session")
def base_model(base_dir) -> Llama:
    return from_pretrained(base_dir).eval()


@pytest.fixture(scope="session")
def base_tok(base_dir):
    return Tokenizer.from_file(str(base_dir / "tokenizer.json"))


@pytest.fixture(scope="session")
def hf_base(base_dir):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def merged_dir(base_dir, tmp_path_factory):
    """The reference merge: 8,981 Korean tokens from the bundled corpus into the real base."""
    out = tmp_path_factory.mktemp("merged")
    tokenizer.build(base_dir, out, data.iter_texts([data.BUNDLED["ko_train"]]),
                    tokenizer.REFERENCE_NEW_TOKENS)
    return out


@pytest.fixture(scope="session")
def merged(merged_dir):
    return Tokenizer.from_file(str(merged_dir / "tokenizer.json"))


@pytest.fixture(scope="session")
def emap(merged_dir):
    return json.loads((merged_dir / "eeve_map.json").read_text())


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory, base_dir) -> Path:
    """A small random Llama with the real SmolLM2 tokenizer: the trainer's tests run on it."""
    out = tmp_path_factory.mktemp("tiny_base")
    torch.manual_seed(0)
    model = Llama(preset("tiny", vocab_size=49152, max_seq_len=512))
    for p in model.parameters():
        if p.ndim == 2:  # GPT-2's init scale, so that the random model's loss is ~ln(vocab)
            torch.nn.init.normal_(p, std=0.02)
    save_pretrained(model, out, bos_token_id=1, eos_token_id=2)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(base_dir / name, out / name)
    return out


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_base) -> Path:
    """One uninterrupted tiny run: the reference the fault tests compare against."""
    out = tmp_path_factory.mktemp("run")
    assert bori.main(tiny_flags(out, tiny_base)) == 0
    return out
