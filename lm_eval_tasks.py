"""A run's grammar probes as lm-evaluation-harness tasks, so that EleutherAI's harness scores the
same pairs bori scores (and the hub benchmarks run beside them).

    python lm_eval_tasks.py RUN_DIR   # writes RUN_DIR/lm_eval/: one task per probe, and prints
                                      # the lm_eval command that runs them on RUN_DIR/final

Each probe becomes a `multiple_choice` task on a local JSON lines file (`dataset_path: json`):
the context is `doc_to_text`, the original and the broken continuation are the two choices
(the original is the target, listed first in half of the pairs: Pair.good_first), with no
delimiter between context and choice, since the continuations carry their own spaces. The
harness's `acc` is then bori's `{probe}_acc` on the same model: the same text split the same
way, the same summed log-probabilities (tests/test_lm_eval_tasks.py checks it with lm_eval
itself, version 0.4.13).
"""
import argparse
import json
import sys
from pathlib import Path

from probes import Pair

# One probe as an lm_eval task. doc_to_text and doc_to_choice name the data file's fields (no
# Jinja, which could touch spaces); target_delimiter "" because the continuations carry their
# own leading space, and lm_eval would otherwise put another between context and choice.
# doc_to_target: the place of the held-out original among the choices.
TASK = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: context
doc_to_choice: choices
doc_to_target: gold
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


def write_tasks(run: Path) -> list:
    """RUN_DIR/lm_eval/bori_{probe}.yaml and its data file for each probe of the run (from
    tokenizer/probes.jsonl, written by the tokenizer stage); returns the task names."""
    source = run / "tokenizer" / "probes.jsonl"
    if not source.is_file():
        raise FileNotFoundError(f"{source} does not exist: the run's tokenizer stage has not "
                                "finished, or it predates the grammar probes (rerun it in a "
                                "new out_dir)")
    by_probe = {}  # probe name -> its documents in the task's format
    for line in source.read_text(encoding="utf-8").splitlines():
        fields = json.loads(line)
        pair = Pair(fields["context"], fields["good"], fields["bad"])
        by_probe.setdefault(fields["probe"], []).append(
            {"context": pair.context, "gold": 0 if pair.good_first else 1,
             "choices": [pair.good, pair.bad] if pair.good_first else [pair.bad, pair.good]})
    out = run / "lm_eval"
    out.mkdir(exist_ok=True)
    for probe, docs in by_probe.items():
        data = out / f"{probe}.jsonl"
        data.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs),
                        encoding="utf-8")
        # an absolute path: lm_eval resolves a relative one against its working folder
        (out / f"bori_{probe}.yaml").write_text(TASK.format(task=f"bori_{probe}",
                                                            data=json.dumps(str(data.resolve()))))
    return [f"bori_{probe}" for probe in by_probe]


def main(argv=None):
    """Write the tasks and print the command that runs them; a run without probes (or not yet
    past its tokenizer stage) is one sentence."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run", help="a bori out_dir")
    args = p.parse_args(argv)
    run = Path(args.run)
    try:
        tasks = write_tasks(run)
    except (OSError, ValueError) as e:
        sys.exit(f"error: {e}")
    print(f"wrote {len(tasks)} tasks to {run / 'lm_eval'}; run them with:\n"
          f"  lm_eval --model hf --model_args pretrained={run / 'final'},dtype=float32 "
          f"--include_path {run / 'lm_eval'} --tasks {','.join(tasks)} --batch_size 16")


if __name__ == "__main__":
    main()
