"""lm_eval_tasks.py: the run's grammar probes as lm-evaluation-harness tasks, scored by lm_eval
itself exactly as bori scores them."""
import json
import shutil

import pytest
import torch
from tokenizers import Tokenizer

import lm_eval_tasks
from evaluate import probe_accuracy, probe_loglikelihoods
from helpers import utility
from hf_io import from_pretrained
from probes import Pair

lm_eval = pytest.importorskip("lm_eval")  # optional for users; requirements-test.txt installs it


@pytest.mark.slow
def test_lm_eval_gives_bori_s_probe_scores_on_the_same_pairs(tiny_run, tmp_path):
    """lm_eval 0.4.13 on the tiny run's exported model (transformers' Llama) with the written
    tasks: each pair's two log-likelihoods equal bori's (its own model and code), so acc and
    acc_norm are the same numbers, and acc is the one the run logged at its end."""
    from lm_eval.tasks import TaskManager
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    out = utility("lm_eval_tasks.py", run)
    assert out.returncode == 0 and "lm_eval --model hf" in out.stdout, out.stderr
    tasks = lm_eval_tasks.write_tasks(run)
    assert sorted(tasks) == ["bori_en_word_order", "bori_ko_particles", "bori_ko_word_order"]
    results = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={run / 'final'},dtype=float32", tasks=tasks,
        task_manager=TaskManager(include_path=str(run / "lm_eval")), device="cpu",
        batch_size=8, log_samples=True)
    model = from_pretrained(run / "final").eval()
    tok = Tokenizer.from_file(str(run / "final" / "tokenizer.json"))
    final = json.loads((run / "phase1b" / "DONE.json").read_text())
    for task in tasks:
        probe = task.removeprefix("bori_")
        docs = [json.loads(line) for line in (run / "lm_eval" / f"{probe}.jsonl").open()]
        pairs = [Pair(d["context"], *d["choices"][::1 if d["gold"] == 0 else -1]) for d in docs]
        assert all(p.good_first == (d["gold"] == 0) for p, d in zip(pairs, docs))
        ours = probe_loglikelihoods(model, tok, pairs, "cpu", torch.autocast("cpu",
                                                                             enabled=False))
        theirs = {s["doc_id"]: [r[0] for r in s["filtered_resps"]]
                  for s in results["samples"][task]}
        assert len(theirs) == len(pairs) > 0
        for i, ((good, bad), doc) in enumerate(zip(ours, docs)):  # theirs: in choice order
            assert theirs[i][doc["gold"]] == pytest.approx(good, abs=1e-4), (task, i)
            assert theirs[i][1 - doc["gold"]] == pytest.approx(bad, abs=1e-4), (task, i)
        acc = probe_accuracy(ours, pairs)
        assert results["results"][task]["acc,none"] == pytest.approx(acc["acc"])
        assert results["results"][task]["acc_norm,none"] == pytest.approx(acc["acc_norm"])
        assert final[f"{probe}_acc"] == pytest.approx(acc["acc"])
