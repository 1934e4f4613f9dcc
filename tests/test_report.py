"""report.py: the plots and the model card of a run, finished or not."""
import shutil

import pytest

from helpers import utility


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
