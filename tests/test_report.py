"""report.py: the plots and the model card of a run, finished or not."""
import json
import shutil
import subprocess
import sys

import pytest
from PIL import Image

import report
from helpers import ENV, ROOT, utility


@pytest.mark.slow
def test_report_says_what_it_wrote_for_a_partial_run_and_a_cut_log(stopped, tiny_run, tmp_path):
    out = utility("report.py", stopped)  # Phase 1A only: a plot, no card
    assert out.returncode == 0, out.stderr
    assert f"wrote {stopped / 'plots' / 'training.png'}\n" in out.stdout
    assert "no model card: the run has no final model yet" in out.stdout
    assert not (stopped / "final").exists()
    run = tmp_path / "finished"
    shutil.copytree(tiny_run, run)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "pha')  # a record a kill cut short
    (run / "final" / "README.md").unlink()
    out = utility("report.py", run)
    assert out.returncode == 0 and str(run / "final" / "README.md") in out.stdout, out.stderr
    card = (tiny_run / "final" / "README.md").read_text()  # the card names the run's folder
    card = card.replace(str(tiny_run), str(run)).replace(f"bori-{tiny_run.name}", "bori-finished")
    assert (run / "final" / "README.md").read_text() == card
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(lines[:3] + ["{oops"] + lines[3:]) + "\n")
    out = utility("report.py", run)
    assert out.returncode == 1 and "metrics.jsonl line 4 is not a JSON record" in out.stderr


def test_report_draws_the_plot_of_a_run_in_training_from_its_records(tmp_path, capsys):
    """In this process, on a run folder made by hand: two phases of two steps, a base line."""
    phases = [{"name": "1a", "folder": "phase1a", "steps": 2},
              {"name": "1b", "folder": "phase1b", "steps": 2}]
    (tmp_path / "config.json").write_text(json.dumps({"lang": "ko", "batch_tokens": 128,
                                                      "phases": phases}))
    records = [{"kind": "eval", "phase": "base", "step": 0, "ko_bpb": 2.0, "en_bpb": 1.0}]
    for phase in ("1a", "1b"):
        records.append({"kind": "eval", "phase": phase, "step": 0, "ko_bpb": 1.9,
                        "en_bpb": 1.0, "fp16_peak": [0.1, 0.2]})
        records += [{"kind": "train", "phase": phase, "step": s, "loss": 3.0 / s, "lr": 1e-3,
                     "tok_per_s": 100.0, "skipped": False} for s in (1, 2)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    report.main([str(tmp_path)])
    out = capsys.readouterr().out
    png = tmp_path / "plots" / "training.png"
    assert f"wrote {png}\n" in out and "no model card: the run has no final model yet" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit) as stop:  # a model folder passed by mistake
        report.main([str(tmp_path / "plots")])
    assert stop.value.code == 2 and "holds no metrics.jsonl" in capsys.readouterr().err


@pytest.mark.slow
def test_four_report_processes_at_once_each_write_whole_files(tiny_run, tmp_path):
    """Four report.py processes on one finished run at the same moment (a user redrawing while
    another notebook cell does): with one shared temporary name, 3 of 4 failed. Each now ends
    with exit 0 and the card and plot are whole: the run's own card, a PNG that opens."""
    run = tmp_path / "finished"
    shutil.copytree(tiny_run, run)
    card = (tiny_run / "final" / "README.md").read_text()
    card = card.replace(str(tiny_run), str(run)).replace(f"bori-{tiny_run.name}", "bori-finished")
    procs = [subprocess.Popen([sys.executable, str(ROOT / "report.py"), str(run)], env=ENV,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(4)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert all(code == 0 for code, _ in results), results
    assert (run / "final" / "README.md").read_text() == card
    with Image.open(run / "plots" / "training.png") as image:
        image.load()  # a truncated or mixed file does not decode
    assert not list(run.rglob("*.tmp"))
