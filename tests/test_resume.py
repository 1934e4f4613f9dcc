"""Exact resume as a property: a run stopped at every step boundary of both phases and at the
hand-over between them, by a clean stop and by SIGKILL, ends bit-identical to one that never
stopped.

The corpora hold short documents, so that a 64-document refill lasts a step or two: streams
refill between checkpoints, and a resumed stream is often saved again before it reads."""
import json
import random
from pathlib import Path

import pytest
import torch
from helpers import command, logged, run_until, tiny_flags, weights

import bori
from errors import EXIT_INTERRUPTED
import data


def short_docs(path: Path, words: list, n: int = 400) -> str:
    rng = random.Random(path.name)
    path.write_text("".join(json.dumps({"text": " ".join(rng.choices(words, k=rng.randint(1, 6)))},
                                       ensure_ascii=False) + "\n" for _ in range(n)))
    return str(path)


def settings(tmp_path: Path) -> dict:
    return dict(
        data_ko=short_docs(tmp_path / "ko.jsonl", "한국어 문서 짧은 글 하나 둘 셋 바다 산 강물".split()),
        data_en=short_docs(tmp_path / "en.jsonl", "a short text of plain English words".split()),
        tokenizer_data=data.BUNDLED["ko_train"], ckpt_every=100)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_base):
    root = tmp_path_factory.mktemp("short_docs")
    flags = settings(root)
    assert bori.main(tiny_flags(root / "ref", tiny_base, **flags)) == 0
    return root / "ref", flags


def assert_same_run(out: Path, ref: Path):
    for key, value in weights(ref / "final").items():
        assert torch.equal(value, weights(out / "final")[key]), key
    assert logged(out) == logged(ref)


@pytest.mark.slow
def test_a_clean_stop_after_every_step_resumes_exactly(reference, tiny_base, tmp_path):
    ref, flags = reference
    codes, argv = [], tiny_flags(tmp_path / "run", tiny_base, stop_after_steps=1, **flags)
    while not codes or codes[-1] == EXIT_INTERRUPTED:
        codes.append(bori.main(argv))  # the same command again and again
        assert len(codes) <= 12
    # a stop after each of the 12 steps but the two that end a phase: Phase 1A's last step
    # runs on into Phase 1B's first, which then stops; Phase 1B's last ends the run
    assert codes == [EXIT_INTERRUPTED] * 10 + [0]
    assert_same_run(tmp_path / "run", ref)


@pytest.mark.slow
def test_sigkill_after_every_checkpoint_and_at_the_handover_resumes_exactly(
        reference, tiny_base, tmp_path):
    ref, flags = reference
    out = tmp_path / "run"
    cmd = command(out, tiny_base, 1, **{**flags, "ckpt_every": 1})
    seen = set()

    def boundaries() -> set:
        """Finished checkpoints (a rename makes them appear whole) and the hand-over."""
        found = {p.relative_to(out).as_posix() for p in out.glob("phase1?/ckpt-??????")}
        return found | ({"handover"} if (out / "phase1a" / "DONE.json").is_file() else set())
    kills = 0
    while True:
        code, err, sent = run_until(cmd, lambda: bool(boundaries() - seen))
        seen |= boundaries()
        if not sent:
            assert code == 0, err[-2000:]
            break
        kills += 1
        assert kills <= 13, err[-2000:]
    assert {"handover", "phase1a/ckpt-000005", "phase1b/ckpt-000005"} <= seen
    assert kills >= 11  # steps 1-5 of each phase, and the hand-over
    assert_same_run(out, ref)
