"""Shared fixtures: the real SmolLM2-135M base (converted once per session from the offline GGUF),
the reference tokenizer merge, a tiny random base, the tiny run's tokenizer and init stages (built
once, copied into each test's out_dir), one uninterrupted tiny run and one run stopped in
Phase 1A."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import tiny_flags
from tokenizers import Tokenizer

import bori
import config
import data
import rundir
import tokenizer
from errors import EXIT_INTERRUPTED, TrainingStopped
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


def stage_settings(argv: list) -> dict:
    """What the tokenizer and init stages are made from (rundir.fixed_by_stage) for these flags;
    the BPE's text is tokenizer_data, or else data_new."""
    cfg = config.load_config(bori.Config, bori.PRESETS, argv, bori.RENAMED)
    fixed = rundir.fixed_by_stage(bori.recipe(cfg))
    settings = {k: getattr(cfg, k) for k in fixed["tokenizer"] + fixed["init"]}
    settings["data_new"] = cfg.tokenizer_data or cfg.data_new
    if settings["init"] == "distill":  # its init stage is EEVE's; distill/ is a stage of its own
        settings["init"] = "eeve"
    return {k: str(v) for k, v in settings.items() if k not in ("tokenizer_data", "out_dir")}


@pytest.fixture(scope="session")
def prepared(tmp_path_factory, tiny_base) -> Path:
    """The tiny run's tokenizer and init stages, built once per session (the run stopped just
    before Phase 1A). Tests copy them into their out_dir with `fresh`: bori skips a stage whose
    DONE.json exists."""
    out = tmp_path_factory.mktemp("prepared")

    def stop_before_training(*args, **kwargs):
        raise TrainingStopped("the prepared stages end here")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bori, "run_phase", stop_before_training)
        assert bori.main(tiny_flags(out, tiny_base)) == EXIT_INTERRUPTED
    assert (out / "tokenizer" / "DONE.json").is_file() and (out / "init" / "DONE.json").is_file()
    assert not (out / "phase1a").exists()
    return out


@pytest.fixture(scope="session")
def fresh(prepared, tiny_base):
    """fresh(out, **overrides): out_dir holding a copy of the prepared tokenizer and init stages
    (and metrics.jsonl's base line); the overrides must leave what those stages are made of as
    it was (checked), the rest (batch, steps, training data...) may change."""
    made_with = stage_settings(tiny_flags(prepared, tiny_base))

    def copy(out: Path, **overrides) -> Path:
        wanted = stage_settings(tiny_flags(out, tiny_base, **overrides))
        assert wanted == made_with, "these settings need their own tokenizer/init stages"
        out.mkdir(parents=True, exist_ok=True)
        for stage in ("tokenizer", "init"):
            shutil.copytree(prepared / stage, out / stage)
        shutil.copy(prepared / "metrics.jsonl", out / "metrics.jsonl")
        return out
    return copy


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_base, fresh) -> Path:
    """One uninterrupted tiny run: the reference the fault tests compare against."""
    out = fresh(tmp_path_factory.mktemp("run") / "run")
    assert bori.main(tiny_flags(out, tiny_base)) == 0
    return out


@pytest.fixture(scope="session")
def stopped_once(tmp_path_factory, tiny_base, fresh) -> Path:
    """A tiny run stopped after Phase 1A step 4, with checkpoints at steps 2 and 4."""
    out = fresh(tmp_path_factory.mktemp("stopped") / "run")
    assert bori.main(tiny_flags(out, tiny_base, stop_after_steps=4)) == EXIT_INTERRUPTED
    assert sorted(p.name for p in (out / "phase1a").glob("ckpt-*")) == ["ckpt-000002",
                                                                         "ckpt-000004"]
    return out


@pytest.fixture
def stopped(tmp_path, stopped_once) -> Path:
    """A copy of stopped_once, for a test to damage or resume."""
    out = tmp_path / "run"
    shutil.copytree(stopped_once, out, ignore=shutil.ignore_patterns(".lock"))
    return out
