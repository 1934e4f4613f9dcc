"""Redraw a run's plots and, once it is finished, its model card, from its records alone.

    python report.py RUN_DIR    # (re)writes RUN_DIR/plots/training.png and RUN_DIR/final/README.md

The run writes both itself as its last stage (final.py); this is for a run that is still
training (its plot so far), a card edited by hand, or a plot deleted. Everything is read from
RUN_DIR's metrics.jsonl, config.json and the stages' DONE.json files.
"""
import argparse
import sys
from pathlib import Path

from final import write


def main(argv=None):
    """Redraw RUN_DIR's plot and card, and say what was written and why anything was not."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run", help="a bori out_dir (it holds metrics.jsonl)")
    args = p.parse_args(argv)
    # metrics.jsonl marks a bori out_dir: a model folder (final/) passed by mistake stops here
    if not (Path(args.run) / "metrics.jsonl").is_file():
        p.error(f"{args.run} holds no metrics.jsonl: pass a bori out_dir")
    try:
        wrote = write(Path(args.run))
    except (OSError, ValueError) as e:  # a cut log or a damaged DONE.json: one sentence, its fix
        sys.exit(f"error: {e}")
    print("wrote " + (", ".join(map(str, wrote)) or "nothing"))
    if not any(p.name == "README.md" for p in wrote):
        print("no model card: the run has no final model yet (it is written when the run ends)")
    if not any(p.suffix == ".png" for p in wrote):
        print("no plot: the log has no training record yet")


if __name__ == "__main__":
    main()
