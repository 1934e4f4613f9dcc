"""Shared fixtures: the real SmolLM2-135M base, converted once per session from the offline GGUF."""
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import data  # noqa: E402
from convert_gguf import OFFLINE_BASE, resolve_base  # noqa: E402
from model import Llama  # noqa: E402

torch.set_num_threads(2)

ENGLISH = [
    "The history of the city goes back to Roman times, when a small settlement was built on the "
    "banks of the river. Over the following centuries it grew into an important trading centre.",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "In 1969, 3 astronauts flew 384,400 km to the Moon; the trip took about 76 hours.",
]
# For perplexity: the converted model gives 7.2; without the Q/K un-permutation, 43.5.
PARAGRAPH = (
    "The history of the city goes back to Roman times, when a small settlement was built on the "
    "banks of the river. Over the following centuries it grew into an important trading centre, "
    "and by the Middle Ages it had become one of the largest towns in the region. Today it is "
    "known for its old cathedral, its university and its markets.")
KOREAN = [
    "대한민국은 민주공화국이다. 대한민국의 주권은 국민에게 있고, 모든 권력은 국민으로부터 나온다.",
    "오늘은 날씨가 맑아서 친구들과 함께 한강 공원에 가서 자전거를 탔습니다.",
]


@pytest.fixture(scope="session")
def base_dir() -> Path:
    return resolve_base(OFFLINE_BASE)


@pytest.fixture(scope="session")
def base_model(base_dir) -> Llama:
    return Llama.from_pretrained(base_dir).eval()


@pytest.fixture(scope="session")
def base_tok(base_dir):
    from tokenizers import Tokenizer
    return Tokenizer.from_file(str(base_dir / "tokenizer.json"))


@pytest.fixture(scope="session")
def hf_base(base_dir):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def merged_dir(base_dir, tmp_path_factory):
    """The reference merge: 8,981 Korean tokens from the bundled corpus into the real base."""
    import tokenizer
    out = tmp_path_factory.mktemp("merged")
    tokenizer.build(base_dir, out, data.iter_texts([data.BUNDLED["ko_train"]]),
                    tokenizer.REFERENCE_NEW_TOKENS)
    return out


@pytest.fixture(scope="session")
def merged(merged_dir):
    from tokenizers import Tokenizer
    return Tokenizer.from_file(str(merged_dir / "tokenizer.json"))


@pytest.fixture(scope="session")
def emap(merged_dir):
    import json
    return json.loads((merged_dir / "eeve_map.json").read_text())


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory, base_dir) -> Path:
    """A small random Llama with the real SmolLM2 tokenizer: the trainer's tests run on it."""
    import shutil

    from model import preset
    out = tmp_path_factory.mktemp("tiny_base")
    torch.manual_seed(0)
    model = Llama(preset("tiny", vocab_size=49152, max_seq_len=512))
    for p in model.parameters():
        if p.ndim == 2:  # GPT-2's init scale, so that the random model's loss is ~ln(vocab)
            torch.nn.init.normal_(p, std=0.02)
    model.save_pretrained(out, bos_token_id=1, eos_token_id=2)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(base_dir / name, out / name)
    return out


def tiny_flags(out_dir, base_dir, **overrides) -> list:
    """A complete but tiny run: a random 2-layer model with the real tokenizer, bundled text."""
    flags = dict(out_dir=out_dir, base=base_dir, data_ko=data.BUNDLED["ko_train"],
                 data_en=data.BUNDLED["en_train"], eval_ko=data.BUNDLED["ko_eval"],
                 eval_en=data.BUNDLED["en_eval"], eval_bytes=1500, new_tokens=300,
                 tokenizer_bytes=300_000, seq_len=32, micro_batch=2, batch_tokens=128,
                 steps_1a=6, lr_1a=1e-2, warmup_1a=1, decay_1a=2, steps_1b=6, lr_1b=1e-2,
                 warmup_1b=1, decay_1b=2, grad_checkpointing=True, eval_every=3,
                 ckpt_every=2, log_every=1, sample_tokens=4, device="cpu")
    flags.update(overrides)
    return [f"--{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in flags.items()]


def weights(folder) -> dict:
    from safetensors.torch import load_file
    return load_file(str(Path(folder) / "model.safetensors"))


def logged(out) -> list:
    """Every metrics record but the wall-clock ones."""
    import json
    clock = ("tok_per_s", "mfu")
    return [{k: v for k, v in r.items() if k not in clock}
            for r in map(json.loads, open(Path(out) / "metrics.jsonl"))]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_base) -> Path:
    """One uninterrupted tiny run: the reference the fault tests compare against."""
    import bori
    out = tmp_path_factory.mktemp("run")
    assert bori.main(tiny_flags(out, tiny_base)) == 0
    return out
