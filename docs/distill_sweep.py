"""The settings sweep behind init=distill's defaults (docs/distill-sweep.txt): fit the K most
frequent new tokens of a finished run's init model as distill.py does (each group alone, from
EEVE's rows) and print the new language's step-0 held-out bits per byte.

    python docs/distill_sweep.py RUN LANG K CONTEXTS BEFORE AFTER STEPS LR [both|mse|ce]

RUN: a run folder with tokenizer/ and, unless it was pruned, init/ (EEVE: runs/experiments/eeve);
without init/model.safetensors the EEVE init is made again from the offline base, as the init
stage makes it.
The last argument drops a term of the loss (the ablation); the default keeps both.
"""
import contextlib
import json
import sys
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import data  # noqa: E402
import distill  # noqa: E402
from evaluate import bits_per_byte  # noqa: E402
from hf_io import from_pretrained  # noqa: E402
from inputs import OFFLINE_BASE, resolve_base  # noqa: E402
from model import drop_padding_rows, expand_vocab  # noqa: E402

run, lang = Path(sys.argv[1]), sys.argv[2]
k, n, before, after, steps = map(int, sys.argv[3:8])
lr, terms = float(sys.argv[8]), (sys.argv[9] if len(sys.argv) > 9 else "both")
if terms != "both":  # one term alone: its own gradient, unweighted
    distill.combined = (lambda mse, ce: mse) if terms == "mse" else (lambda mse, ce: ce)
s = distill.Settings(tokens=k, contexts=n, before=before, after=after, steps=steps, lr=lr)
tok = Tokenizer.from_file(str(run / "tokenizer" / "tokenizer.json"))
emap = json.loads((run / "tokenizer" / "eeve_map.json").read_text())
n_old = emap["base_vocab_size"]
if (run / "init" / "model.safetensors").is_file():
    model = from_pretrained(run / "init")
else:
    model = drop_padding_rows(from_pretrained(resolve_base(OFFLINE_BASE)), n_old)
    expand_vocab(model, emap["pieces"], "eeve")
model = model.eval().requires_grad_(False)
ctx = contextlib.nullcontext()
# the demo's held-out text (its first 4,000 bytes), never a window's
evals = data.eval_docs(data.BUNDLED[f"{lang}_eval"], 4000, "text")
held_out = {data.text_key(t) for t in evals}
texts = [t for t in data.iter_texts([data.BUNDLED[f"{lang}_train"]])
         if data.text_key(t) not in held_out]
found = distill.windows(texts, tok, tok.token_to_id(data.EOS_TOKEN), n_old, s)
tokens, fitted, t0 = list(found), [], time.time()
for g in range(0, len(tokens), distill.GROUP_TOKENS):
    group = tokens[g:g + distill.GROUP_TOKENS]
    rows, _, first, last = distill.fit_group(model, group, found, emap["pieces"], n_old, s, ctx)
    fitted.append((group, rows))
seconds = time.time() - t0
with torch.no_grad():  # written after all groups: each was fitted against EEVE's rows alone
    for group, rows in fitted:
        model.embed_tokens.weight[group] = rows
bpb = bits_per_byte(model, tok, evals, 256, "cpu", ctx)
print(f"K={k} contexts={n} before={before} after={after} steps={steps} lr={lr:g} "
      f"terms={terms}: fit {seconds:.0f} s, step-0 {lang} bits/byte {bpb:.4f}")
