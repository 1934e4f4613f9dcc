"""checkpoint.py: checkpoints that prove they are whole, the stages' DONE.json and hand-over
files, and no pickle of untrusted data."""
import re
import shutil

import pytest
import torch

import bori
import checkpoint
from helpers import ROOT, flip_bit, one_error, tiny_flags


@pytest.mark.slow
def test_no_whole_checkpoint_left_is_one_sentence(stopped, tiny_base, capsys):
    for ckpt in (stopped / "phase1a").glob("ckpt-*"):
        flip_bit(ckpt / "model.safetensors")
    capsys.readouterr()
    assert bori.main(tiny_flags(stopped, tiny_base)) == 2
    assert re.search(r"every checkpoint in .*phase1a is damaged \(moved to ckpt-000004.corrupt, "
                     r"ckpt-000002.corrupt\); delete .*phase1a to start the phase over",
                     one_error(capsys))


@pytest.mark.slow
def test_a_checkpoint_without_its_manifest_is_damaged_unless_it_predates_manifests(stopped):
    """Decided by the format trainer.pt records, not by the manifest's absence: a lost
    manifest.json is damage; a checkpoint of bori before manifests (no format) is whole."""
    newest = stopped / "phase1a" / "ckpt-000004"
    assert checkpoint.checkpoint_damage(newest) == ""
    (newest / "manifest.json").unlink()
    assert checkpoint.checkpoint_damage(newest) == "its manifest.json is missing"
    trainer = torch.load(newest / "trainer.pt", weights_only=True)
    assert trainer.pop("format") == 2
    torch.save(trainer, newest / "trainer.pt")  # as bori before manifests wrote it
    assert checkpoint.checkpoint_damage(newest) == ""
    (newest / "trainer.pt").write_bytes(b"cut")
    assert "its trainer.pt is unreadable" in checkpoint.checkpoint_damage(newest)


@pytest.mark.slow
def test_a_missing_handover_file_is_said(tiny_run, tiny_base, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(tiny_run, out, ignore=shutil.ignore_patterns("phase1b", "final*"))
    (out / "phase1a" / "data-rank0.pt").unlink()
    assert bori.main(tiny_flags(out, tiny_base)) == 2
    assert re.search(r"phase1a: data-rank0.pt is missing since the stage finished; restore it "
                     r"or delete .*phase1a to redo that stage", one_error(capsys))


def test_no_pickle_of_untrusted_data():
    """Weights go through safetensors; every torch.load passes weights_only=True."""
    for path in ROOT.glob("*.py"):
        text = path.read_text()
        assert "import pickle" not in text, path
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, (path, call)
    assert re.findall(r"torch\.load\(", (ROOT / "checkpoint.py").read_text())
