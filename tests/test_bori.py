"""bori.py: the training step and the loop, which parameters each phase trains, what ends a
phase, and main()'s flags."""
import math
import re
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import bori
import data
import model as model_module
from distributed import DistEnv, autocast
from errors import EXIT_INTERRUPTED
from helpers import logged, one_error, tiny_flags, weights
from model import Llama, preset
from schedule import lr_at


def poison_weights_at(monkeypatch, phase: str, step: int):
    """After the given step, set one weight to NaN (the step itself stays finite)."""
    original = bori.train_step

    def step_then_poison(run, t, batches):
        out = original(run, t, batches)
        if t.phase_dir.name == f"phase{phase}" and t.step + 1 == step:
            with torch.no_grad():
                t.raw_model.norm.weight[0] = float("nan")
        return out
    monkeypatch.setattr(bori, "train_step", step_then_poison)


@pytest.mark.slow
def test_a_phase_ending_with_nan_weights_is_not_marked_done(monkeypatch, tmp_path, tiny_base,
                                                            capsys, fresh):
    poison_weights_at(monkeypatch, "1a", 6)  # the last step of Phase 1A
    assert bori.main(tiny_flags(fresh(tmp_path), tiny_base)) == 2
    assert re.search(r"phase 1a ended with non-finite weights, so it is not marked done",
                     one_error(capsys))
    assert not (tmp_path / "phase1a" / "DONE.json").exists()
    assert not (tmp_path / "phase1a" / "model").exists() and not (tmp_path / "final").exists()


def poison_losses(monkeypatch, phase: str, steps: set):
    """Make the loss of the given steps (1-based, counted from the phase's start) infinite."""
    original = bori.train_step

    def poisoned(run, t, batches):
        if t.phase_dir.name == f"phase{phase}" and t.step + 1 in steps:
            model_forward = t.model.forward
            t.model.forward = lambda *a, **k: model_forward(*a, **k) * float("inf")
            try:
                return original(run, t, batches)
            finally:
                del t.model.forward
        return original(run, t, batches)
    monkeypatch.setattr(bori, "train_step", poisoned)


@pytest.mark.slow
def test_a_phase_whose_every_step_was_skipped_fails(monkeypatch, tmp_path, tiny_base, capsys,
                                                    fresh):
    poison_losses(monkeypatch, "1a", set(range(1, 7)))
    assert bori.main(tiny_flags(fresh(tmp_path), tiny_base, max_bad_steps=100)) == 2
    assert "phase 1a ended with no step applied" in one_error(capsys)
    assert not (tmp_path / "phase1a" / "DONE.json").exists()


@pytest.mark.slow
def test_the_non_finite_streak_goes_on_across_the_phase_boundary(monkeypatch, tmp_path,
                                                                   tiny_base, capsys, fresh):
    poison_losses(monkeypatch, "1a", {5, 6})
    poison_losses(monkeypatch, "1b", {1})
    assert bori.main(tiny_flags(fresh(tmp_path), tiny_base, max_bad_steps=3)) == 2
    assert re.search(r"phase 1b: loss or gradients were non-finite for 3 steps in a row, up to "
                     r"step 0", one_error(capsys))


@pytest.mark.slow
def test_resuming_with_fewer_steps_than_the_checkpoint_is_refused(stopped, tiny_base, capsys):
    assert bori.main(tiny_flags(stopped, tiny_base, steps_1a=3)) == 2
    assert re.search(r"ckpt-000004 is at step 4, past steps_1a=3; use steps_1a>=4, or delete "
                     r".*phase1a to train the phase again", one_error(capsys))


@pytest.mark.slow
def test_stop_after_steps_counts_the_whole_invocation_across_phases(stopped, tiny_base):
    """stopped: Phase 1A (6 steps) stopped at step 4. Four more steps in one invocation are
    1A's 5 and 6 and 1B's 1 and 2: the count does not start again with Phase 1B."""
    assert bori.main(tiny_flags(stopped, tiny_base, stop_after_steps=4)) == EXIT_INTERRUPTED
    assert (stopped / "phase1a" / "DONE.json").is_file()
    assert [p.name for p in sorted((stopped / "phase1b").glob("ckpt-*"))] == ["ckpt-000002"]


@pytest.mark.slow
def test_max_hours_counts_from_the_start_of_the_command(monkeypatch, tmp_path, tiny_base,
                                                       fresh, capsys):
    """The stages before training spend the same budget: a prepare that takes 4 s of a
    3-second max_hours leaves nothing for Phase 1A, which stops before its first step."""
    original = bori.prepare_model

    def slow_prepare(run):
        original(run)
        time.sleep(4)
    monkeypatch.setattr(bori, "prepare_model", slow_prepare)
    out = fresh(tmp_path / "run")
    assert bori.main(tiny_flags(out, tiny_base, max_hours=3 / 3600)) == EXIT_INTERRUPTED
    assert "stopped at phase 1a step 0" in capsys.readouterr().err
    assert not list((out / "phase1a").glob("ckpt-*"))


def poison_loss(monkeypatch, calls: set, value=float("inf")):
    """Multiply the training loss of the given forward calls (1-based) by inf or nan."""
    original, count = model_module.Llama.forward, [0]

    def forward(self, idx, targets=None, *args, **kwargs):
        out = original(self, idx, targets, *args, **kwargs)
        if targets is not None and self.training:
            count[0] += 1
            if count[0] in calls or (-1 in calls and count[0] > 4):
                out = out * value
        return out
    monkeypatch.setattr(model_module.Llama, "forward", forward)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_overflowing_steps_are_skipped_and_logged(dtype, monkeypatch, tmp_path, tiny_base, fresh):
    poison_loss(monkeypatch, {3, 4})  # step 2 (two micro-batches a step) overflows
    assert bori.main(tiny_flags(fresh(tmp_path), tiny_base, dtype=dtype)) == 0
    train = [r for r in logged(tmp_path) if r["kind"] == "train" and r["phase"] == "1a"]
    assert [r["skipped"] for r in train[:3]] == [False, True, False]
    if dtype == "float16":  # GradScaler halved its scale on the overflow
        assert train[1]["scale"] == train[0]["scale"] / 2
    else:  # without a scaler, bori skips the step itself
        assert train[1]["grad_norm"] != train[1]["grad_norm"] or train[1]["grad_norm"] > 1e30


@pytest.mark.slow
def test_a_loss_that_stays_nan_stops_the_run(monkeypatch, tmp_path, tiny_base, capsys, fresh):
    poison_loss(monkeypatch, {-1}, float("nan"))
    code = bori.main(tiny_flags(fresh(tmp_path), tiny_base, max_bad_steps=3, dtype="float16"))
    err = capsys.readouterr().err
    assert code == 2
    assert re.search(r"error: phase 1a: loss or gradients were non-finite for 3 steps in a row, "
                     r"up to step 4; the last good checkpoint is .*ckpt-000002", err), err


def test_debug_flag_shows_the_traceback(tmp_path, tiny_base):
    with pytest.raises(ValueError, match="unknown preset"):
        bori.main([*tiny_flags(tmp_path, tiny_base), "--preset=huge", "--debug=true"])


@pytest.mark.slow
def test_phase_1a_trains_only_embeddings_and_1b_everything(tiny_run):
    init, a, b = (weights(tiny_run / p) for p in ("init", "phase1a/model", "phase1b/model"))
    assert set(init) == set(a) == set(b)
    for key in init:
        changed = not torch.equal(init[key], a[key])
        assert changed == (key == "model.embed_tokens.weight"), key
        assert not torch.equal(a[key], b[key]), key


@pytest.mark.slow
@pytest.mark.parametrize("compiled", [False, True])
def test_phase_1a_new_rows_only_keeps_old_rows_bit_identical(tmp_path, tiny_base, compiled,
                                                             fresh):
    from torch._dynamo.utils import counters
    torch._dynamo.reset()  # other tests' compiled graphs count toward the recompile limit
    counters.clear()
    assert bori.main(tiny_flags(fresh(tmp_path), tiny_base, new_rows_only=True, steps_1b=1,
                                warmup_1b=0, decay_1b=1, compile=compiled)) == 0
    assert (counters["stats"]["unique_graphs"] > 0) == compiled
    before = weights(tmp_path / "init")["model.embed_tokens.weight"]
    after = weights(tmp_path / "phase1a/model")["model.embed_tokens.weight"]
    assert torch.equal(after[:49152], before[:49152])
    assert (after[49152:] != before[49152:]).any(dim=1).all()  # every new row moved


def test_english_is_held_out_from_the_replay_by_default():
    cfg = bori.Config()
    assert cfg.eval_en == cfg.data_en and cfg.eval_new != cfg.data_new  # fineweb-2: a test split

# ----------------------------------------------------------------------------------------------
# The numerical guard: accumulation, overfitting one batch, and the first losses of a seeded run

EXPECTED_LOSS = Path(__file__).parent / "expected_loss.txt"


def tiny_training(optimizer: str = "adamw", grad_clip: float = 1.0, dtype: str = "float32"):
    """A seeded tiny model (model.preset("tiny")) and the (run, training) pair train_step takes,
    on the CPU: AdamW as bori.make_optimizer makes it for Phase 1B, or plain SGD (whose update
    is proportional to the gradient, so that a gradient off by a factor shows in the weights)."""
    torch.manual_seed(0)
    model = Llama(preset("tiny"))
    for p in model.parameters():
        if p.ndim == 2:  # GPT-2's init scale, as conftest's tiny base: a loss of ~ln(vocab)
            torch.nn.init.normal_(p, std=0.02)
    cfg = bori.Config(grad_clip=grad_clip, dtype=dtype)
    phase_1b = bori.recipe(cfg)[1]
    bori.set_trainable(model, phase_1b, n_old_rows=model.cfg.vocab_size)
    opt = (bori.make_optimizer(model, cfg, phase_1b) if optimizer == "adamw"
           else torch.optim.SGD(model.parameters(), lr=0.0))
    env = DistEnv(device=torch.device("cpu"))
    run = SimpleNamespace(cfg=cfg, env=env, ctx=autocast(dtype, env.device)[0])
    training = SimpleNamespace(model=model, raw_model=model, optimizer=opt,
                               scaler=torch.amp.GradScaler("cpu", enabled=False))
    return run, training


def set_lr(training, lr: float):
    for group in training.optimizer.param_groups:
        group["lr"] = lr


def korean_bytes_batches(n_batches: int, rows: int, seq_len: int = 32) -> list:
    """(x, y) micro-batches of the bundled Korean corpus's UTF-8 bytes (ids < 256 < the tiny
    vocabulary), read in order: no tokenizer, no randomness."""
    need, text = n_batches * rows * (seq_len + 1), b""
    for doc in data.iter_texts([data.BUNDLED["ko_train"]]):
        text += doc.encode() + b"\n"
        if len(text) >= need:
            break
    ids = torch.tensor(list(text[:need]))
    blocks = ids.view(n_batches, rows, seq_len + 1)
    return [(b[:, :-1], b[:, 1:]) for b in blocks]


def test_accumulating_two_micro_batches_equals_one_step_on_the_doubled_batch():
    """One train_step on 2 micro-batches of 4 rows: the loss, the gradient norm and the updated
    weights of one step on the same 8 rows as one micro-batch (fp32, SGD: the update is lr
    times the gradient, so a gradient off by any factor shows; AdamW's first step, about
    lr * sign(g), would hide it, and flips near-zero coordinates on a rounding difference)."""
    x, y = korean_bytes_batches(1, 8)[0]
    results = []
    for batches in ([(x[:4], y[:4]), (x[4:], y[4:])], [(x, y)]):
        run, training = tiny_training("sgd", grad_clip=1e9)  # no clipping: the raw gradient
        set_lr(training, 100.0)  # updates far above the weights' rounding (~2e-9)
        before = {k: v.detach().clone() for k, v in training.raw_model.state_dict().items()}
        loss, grad_norm, skipped = bori.train_step(run, training, batches)
        assert not skipped
        after = training.raw_model.state_dict()
        results.append((loss, grad_norm, {k: after[k] - before[k] for k in before}))
    (loss_a, norm_a, moved_a), (loss_b, norm_b, moved_b) = results
    assert loss_a == pytest.approx(math.log(512), rel=0.05)  # a random model: ~ln(vocab)
    assert loss_a == pytest.approx(loss_b, rel=1e-6, abs=0)
    assert norm_a == pytest.approx(norm_b, rel=1e-5, abs=0)
    for key in moved_b:
        assert moved_b[key].abs().max() > 0, key  # every tensor moved
        assert (moved_a[key] - moved_b[key]).abs().max() <= 1e-5 * moved_b[key].abs().max(), key


def test_a_tiny_model_overfits_one_batch():
    """60 AdamW steps at lr 1e-2 on one batch of 8x32 tokens: from ~ln(512) = 6.24 to below 0.1
    (measured: 0.02)."""
    run, training = tiny_training("adamw")
    set_lr(training, 1e-2)
    batch = korean_bytes_batches(1, 8)
    losses = [bori.train_step(run, training, batch)[0] for _ in range(60)]
    assert losses[0] == pytest.approx(math.log(512), rel=0.05)
    assert losses[-1] < 0.1, losses[-10:]
    assert all(math.isfinite(v) for v in losses)


def tiny_seeded_losses() -> list:
    """The first 10 losses of a seeded tiny run: bori's AdamW for Phase 1B, its clipping, the WSD
    schedule (warmup 3, decay 4 of 10 steps), 2 micro-batches of 4 rows a step, Korean bytes."""
    run, training = tiny_training("adamw")
    batches = korean_bytes_batches(20, 4)
    losses = []
    for step in range(10):
        set_lr(training, lr_at(step, peak_lr=3e-3, total_steps=10, warmup_steps=3,
                               decay_steps=4, min_lr_ratio=0.1))
        losses.append(bori.train_step(run, training, batches[2 * step: 2 * step + 2])[0])
    return losses


def test_the_first_10_losses_of_a_seeded_tiny_run_are_the_recorded_ones():
    lines = EXPECTED_LOSS.read_text().splitlines()
    assert lines[0].startswith("# ")  # how to regenerate the file
    expected = [float(v) for v in lines[1:]]
    got = tiny_seeded_losses()
    assert len(expected) == len(got) == 10
    assert got == pytest.approx(expected, rel=1e-6, abs=0), (got, expected)


if __name__ == "__main__":  # regenerates tests/expected_loss.txt (see its first line)
    torch.set_num_threads(2)  # as conftest sets it
    EXPECTED_LOSS.write_text(
        "# the first 10 losses of test_bori.tiny_seeded_losses(); regenerate with: "
        "PYTHONPATH=.:tests python3 tests/test_bori.py\n"
        + "".join(f"{v!r}\n" for v in tiny_seeded_losses()))
