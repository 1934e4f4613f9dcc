"""bori.py as it runs, each rank recording the text it trains on: `python traced_run.py TRACE_DIR
--flags...` (under torchrun too). test_recipe's held-out test reads what it writes.

Nothing in the run changes: a few functions are wrapped to note their results. Each rank writes
TRACE_DIR/rank-R.json with every token id each of its training streams read, with the pass it
belongs to, and how many of them it handed to training (one record per stream object: a phase's
stream of a source), the held-out texts it was given and the text_key of every held-out
document (the eval texts' and the grammar probes'), the texts the BPE read (on rank 0), and the
texts token distillation took its windows from (init=distill, on every rank).
"""
import json
import sys
from pathlib import Path

import bori
import data
import distill
import prepare

trace = {"streams": {}, "held_out": {}, "held_out_keys": [], "bpe": [], "distill": []}

take, refill = data.PackedStream.take, data.PackedStream._refill


def stream_trace(stream) -> dict:
    """One stream object's record: the tokens it read, refill by refill, each with the pass
    (epoch) it belongs to, and how many of them it handed on to training. A phase that takes
    over a stream starts with the tokens left in its buffer (the first of which may be the
    middle of a document)."""
    name = f"{stream.src.name}-{id(stream)}"
    if name not in trace["streams"]:
        trace["streams"][name] = {"read": [[stream.epoch, list(stream.buffer)]], "taken": 0}
    return trace["streams"][name]


def traced_take(self, n):  # what a training stream gives the batch: consecutive tokens
    record = stream_trace(self)
    out = take(self, n)
    record["taken"] += len(out)
    return out


def traced_refill(self):  # one refill never spans two passes: it stops at the end of one
    record, before = stream_trace(self), len(self.buffer)
    refill(self)
    record["read"].append([self.epoch, self.buffer[before:]])


eval_sets = bori.eval_sets


def traced_eval_sets(*args, **kwargs):
    evals, keys = eval_sets(*args, **kwargs)
    trace["held_out"] = evals
    trace["held_out_keys"] += [k.hex() for k in keys]
    return evals, keys


probe_texts = bori.probe_texts


def traced_probe_texts(*args, **kwargs):  # the probes' documents are held out as well
    texts, keys = probe_texts(*args, **kwargs)
    trace["held_out_keys"] += [k.hex() for k in keys]
    return texts, keys


bpe_training_text = prepare.bpe_training_text


def traced_bpe_training_text(run):
    for text in bpe_training_text(run):
        trace["bpe"].append(text)
        yield text


windows = distill.windows


def traced_windows(texts, *args, **kwargs):  # the text token distillation takes windows from
    texts = list(texts)
    trace["distill"] += texts
    return windows(texts, *args, **kwargs)


data.PackedStream.take, data.PackedStream._refill = traced_take, traced_refill
bori.eval_sets, bori.probe_texts = traced_eval_sets, traced_probe_texts
prepare.bpe_training_text, distill.windows = traced_bpe_training_text, traced_windows

if __name__ == "__main__":
    out = Path(sys.argv[1])
    code = bori.main(sys.argv[2:])
    rank = bori.launched().rank
    (out / f"rank-{rank}.json").write_text(json.dumps(trace, ensure_ascii=False))
    sys.exit(code)
