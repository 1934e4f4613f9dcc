"""Token distillation (distill.py): the windows and pairs by hand, the fitted rows against a
second code path (whole-model forward passes), and the stage: resumed after a kill, and the same
bytes on 1, 2 and 3 processes."""
import copy
import json
import signal
import subprocess
from contextlib import nullcontext

import pytest
import torch
from helpers import ENV, command, cut_short, run_until, tiny_flags, weights
from tokenizers import Tokenizer

import bori
import data
import distill
from errors import EXIT_INTERRUPTED, TrainingStopped
from hf_io import from_pretrained

SETTINGS = distill.Settings(tokens=40, contexts=3, before=6, after=5, steps=8, lr=1e-2)
FLAGS = dict(init="distill", distill_tokens=40, distill_contexts=3, distill_before=6,
             distill_after=5, distill_steps=8, distill_lr=1e-2, distill_bytes=200_000)


def test_pair_by_hand():
    """Teacher: every new token as its pieces; student: the same but this occurrence; both cut
    to `before` base tokens before it and `after` after."""
    pieces = [[7, 8, 9], [5, 6]]  # new ids 100 and 101
    window = [1, 101, 2, 100, 3, 101]  # the occurrence: 100 at index 3
    s = distill.Settings(tokens=0, contexts=1, before=3, after=2, steps=1, lr=1.0)
    teacher, student, at = distill.pair(window, 3, pieces, 100, s)
    assert teacher == [5, 6, 2, 7, 8, 9, 3, 5]
    assert student == [5, 6, 2, 100, 3, 5]
    assert at == 3


def test_windows_by_hand(merged):
    """The most frequent new tokens first; one window per document, at its first occurrence."""
    texts = ["대한민국 대한민국 대한민국", "대한민국의 수도", "서울 대한민국"]
    n_old = 49152
    docs = [merged.encode(t).ids for t in texts]
    s = distill.Settings(tokens=2, contexts=5, before=1, after=1, steps=1, lr=1.0)
    found = distill.windows(texts, merged, 0, n_old, s)
    counts = {}
    for d in docs:
        for i in d:
            if i >= n_old:
                counts[i] = counts.get(i, 0) + 1
    top = sorted(counts, key=lambda i: (-counts[i], i))[:2]
    assert list(found) == top
    for t in top:
        expect = []
        for d in docs:
            ids = [0] + d
            if t in ids:
                p = ids.index(t)
                expect.append((ids[p - 1:p + 2], 1))
        assert found[t] == expect


@pytest.fixture(scope="module")
def fitted(prepared):
    """40 new tokens of the tiny run fitted on the bundled Korean text."""
    model = from_pretrained(prepared / "init").eval().requires_grad_(False)
    tok = Tokenizer.from_file(str(prepared / "tokenizer" / "tokenizer.json"))
    emap = json.loads((prepared / "tokenizer" / "eeve_map.json").read_text())
    texts = list(data.iter_texts([data.BUNDLED["ko_train"]]))[:200]
    found = distill.windows(texts, tok, 0, emap["base_vocab_size"], SETTINGS)
    tokens = list(found)[:16]
    rows, _, first, last = distill.fit_group(model, tokens, found, emap["pieces"],
                                             emap["base_vocab_size"], SETTINGS, nullcontext())
    return model, emap, found, tokens, rows, first, last


def reference_losses(model, emap, found, tokens, rows):
    """The two terms the other way: whole sequences through model.hidden and model(), with the
    rows written into a copy of the embedding (tied: the head too)."""
    n_old, pieces = emap["base_vocab_size"], emap["pieces"]
    weight = model.embed_tokens.weight.detach().clone()
    weight[tokens] = rows
    mse, n, ce = 0.0, 0, 0.0
    for t in tokens:
        for w, at in found[t]:
            teacher, student, i = distill.pair(w, at, pieces, n_old, SETTINGS)
            with torch.no_grad():
                th = model.hidden(torch.tensor([teacher]))[0]
                saved = model.embed_tokens.weight.data
                model.embed_tokens.weight.data = weight
                sh = model.hidden(torch.tensor([student]))[0]
                logits = model(torch.tensor([student]))[0, i - 1]
                model.embed_tokens.weight.data = saved
            k = len(pieces[t - n_old]) - 1
            mse += ((sh[i:] - th[i + k:]) ** 2).sum().item() / sh.shape[-1]
            n += len(student) - i
            ce += torch.nn.functional.cross_entropy(logits[None], torch.tensor([t])).item()
    count = sum(len(found[t]) for t in tokens)
    return mse / n, ce / count


def test_the_row_moves_toward_the_teacher(fitted):
    """Both terms, computed the other way, fall from EEVE's rows to the fitted ones; the loss the
    fit reports is their alpha-weighted sum (alpha = MSE / CE: twice the MSE)."""
    model, emap, found, tokens, rows, first, last = fitted
    eeve = model.embed_tokens.weight.detach()[tokens]
    mse0, ce0 = reference_losses(model, emap, found, tokens, eeve)
    mse1, ce1 = reference_losses(model, emap, found, tokens, rows)
    assert first == pytest.approx(2 * mse0, rel=1e-4)  # one chunk: alpha makes it 2 x MSE
    assert last == pytest.approx(2 * mse1, rel=1e-4)
    assert mse1 < 0.8 * mse0 and ce1 < ce0
    assert not torch.equal(rows, eeve)


def run_to_distilled(out, tiny_base) -> int:
    """bori.main up to the end of the distill stage (Phase 1A is not started)."""
    def stop(*args, **kwargs):
        raise TrainingStopped("the test ends here")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bori, "run_phase", stop)
        return bori.main(tiny_flags(out, tiny_base, **FLAGS))


@pytest.fixture(scope="module")
def distilled(tmp_path_factory, tiny_base, fresh):
    out = fresh(tmp_path_factory.mktemp("distilled") / "run", **FLAGS)
    assert run_to_distilled(out, tiny_base) == EXIT_INTERRUPTED
    return out


@pytest.mark.slow
def test_only_the_distilled_rows_change(distilled):
    """Every base row and every new row not distilled stays bit-identical; the 40 change."""
    init = weights(distilled / "init")["model.embed_tokens.weight"]
    after = weights(distilled / "distill" / "init")["model.embed_tokens.weight"]
    changed = (init != after).any(dim=1).nonzero().flatten().tolist()
    n_old = json.loads((distilled / "init" / "DONE.json").read_text())["n_old_rows"]
    assert len(changed) == 40 and min(changed) >= n_old
    assert json.loads((distilled / "distill" / "DONE.json").read_text())["groups"] == 3


@pytest.mark.slow
def test_the_stage_resumes_after_a_kill_and_is_the_same_on_two_and_three_processes(
        tmp_path, tiny_base, fresh, distilled):
    """Killed once the first group's file is written, that file cut short, run again: the same
    bytes; and under torchrun with 2 and 3 processes, sharing the groups: the same bytes."""
    reference = weights(distilled / "distill" / "init")
    for world in (1, 2, 3):
        out = fresh(tmp_path / f"w{world}", **FLAGS)
        # the whole tiny run, 1A starting from it; 384 tokens a step divide among 1, 2, 3 ranks
        cmd = command(out, tiny_base, world, **FLAGS, batch_tokens=384)
        if world == 1:
            groups = out / "distill" / "groups"
            run_until(cmd, lambda: any(groups.glob("group-*.safetensors")), sig=signal.SIGKILL)
            assert not (out / "distill" / "DONE.json").exists()
            cut_short(next(groups.glob("group-*.safetensors")))  # harmed: fitted again
        done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr
        assert (out / "distill" / "DONE.json").is_file()
        got = weights(out / "distill" / "init")
        assert all(torch.equal(got[k], reference[k]) for k in reference), world


def test_an_untied_head_gets_its_own_rows(fitted):
    """With a head of its own, the CE term fits the head's new rows (from EEVE's, the first
    piece's row) and the MSE the input rows: the head's CE falls, computed through model()."""
    model, emap, found, tokens, *_ = fitted
    untied = copy.deepcopy(model)
    untied.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone(),
                                               requires_grad=False)
    rows, out_rows, first, last = distill.fit_group(untied, tokens, found, emap["pieces"],
                                                    emap["base_vocab_size"], SETTINGS,
                                                    nullcontext())
    assert out_rows is not None and last < first

    def head_ce(head_rows):
        untied.lm_head.weight.data[tokens] = head_rows
        ce = []
        for t in tokens:
            for w, at in found[t]:
                _, student, i = distill.pair(w, at, emap["pieces"], emap["base_vocab_size"],
                                             SETTINGS)
                with torch.no_grad():
                    logits = untied(torch.tensor([student[:i]]))[0, -1]
                ce.append(torch.nn.functional.cross_entropy(logits[None], torch.tensor([t])))
        return float(sum(ce) / len(ce))
    eeve_head = model.lm_head.weight.detach()[tokens].clone()
    assert head_ce(out_rows) < head_ce(eeve_head) - 0.1
    assert not torch.equal(rows, model.embed_tokens.weight.detach()[tokens])
