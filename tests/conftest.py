"""Shared fixtures: the real SmolLM2-135M base, converted once per session from the offline GGUF."""
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from convert_gguf import OFFLINE_BASE, resolve_base  # noqa: E402
from model import Llama  # noqa: E402

torch.set_num_threads(2)

ENGLISH = [
    "The history of the city goes back to Roman times, when a small settlement was built on the "
    "banks of the river. Over the following centuries it grew into an important trading centre.",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "In 1969, 3 astronauts flew 384,400 km to the Moon; the trip took about 76 hours.",
]
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
