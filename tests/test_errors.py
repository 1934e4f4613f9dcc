"""errors.py: the one line and exit code each failure ends in."""
import torch

import bori
from helpers import tiny_flags


def test_out_of_gpu_memory_names_the_fix(monkeypatch, tmp_path, tiny_base, capsys):
    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(bori, "prepare_model", oom)  # the first stage: no stage is built
    assert bori.main(tiny_flags(tmp_path, tiny_base)) == 3
    assert "lower micro_batch" in capsys.readouterr().err
