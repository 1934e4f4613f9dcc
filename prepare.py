"""Before training: the held-out texts, the merged tokenizer, the expanded EEVE-initialised model.

Rank 0 runs them (bori.run_all) while the other ranks wait. Each writes its folder's DONE.json
last and is skipped once that exists, so a killed run redoes at most the stage it was in.
"""
import json
from pathlib import Path

from tokenizers import Tokenizer

import data
import tokenizer
from atomic import write_json
from base_model import check_merged_tokenizer
from checkpoint import export_folder
from evaluate import evaluate, print_tokenizer_report, tokenizer_report
from hf_io import from_pretrained
from model import expand_vocab


def eval_sets(cfg) -> dict:
    """The held-out texts per language: the first eval_bytes of each eval source."""
    return {"ko": data.eval_docs(cfg.eval_ko, cfg.eval_bytes, cfg.text_field),
            "en": data.eval_docs(cfg.eval_en, cfg.eval_bytes, cfg.text_field)}


def bpe_training_text(run):
    """The first tokenizer_bytes (0: all) of the Korean text the BPE is trained on."""
    cfg, total = run.cfg, 0
    path = cfg.tokenizer_data or cfg.data_ko
    for text in data.iter_texts([path], cfg.text_field, progress=True):
        run.check_stop("the tokenizer was trained")
        yield text
        total += len(text.encode("utf-8"))
        if cfg.tokenizer_bytes and total >= cfg.tokenizer_bytes:
            return
    if total == 0:
        raise ValueError(f"tokenizer data {path!r} has no text; point data_ko (or "
                         "tokenizer_data) at Korean text")


def stage_tokenizer(run, base_dir: Path):
    """out_dir/tokenizer: the merged tokenizer, its EEVE map, and how it compresses held-out
    text against the base and the standalone BPE (report.json)."""
    tok_dir = run.out / "tokenizer"
    if (tok_dir / "DONE.json").is_file():
        return
    done = tokenizer.build(base_dir, tok_dir, bpe_training_text(run), run.cfg.new_tokens,
                           run.cfg.unicode_script)
    report = tokenizer_report(base_dir, tok_dir, run.evals)
    print_tokenizer_report(report)
    write_json(tok_dir / "report.json", report)
    write_json(tok_dir / "DONE.json", {**done, **report})


def stage_init(run, base_dir: Path):
    """out_dir/init: the base model's held-out bits per byte (the reference line), then the
    model with its embedding grown by one EEVE-initialised row per new token."""
    cfg, init_dir, tok_dir = run.cfg, run.out / "init", run.out / "tokenizer"
    if (init_dir / "DONE.json").is_file():
        return
    run.check_stop("the init stage")
    base = from_pretrained(base_dir).to(run.env.device)
    base_tok = Tokenizer.from_file(str(base_dir / "tokenizer.json"))
    emap = json.loads((tok_dir / "eeve_map.json").read_text())
    check_merged_tokenizer(base_dir, base_tok, base.cfg.vocab_size, tok_dir, emap)
    run.metrics.truncate_after("base", 0)
    scores = evaluate(base, base_tok, run.evals, cfg.seq_len, run.env.device, run.ctx)
    run.metrics.log(kind="eval", phase="base", step=0, **scores)
    print("base model: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()), flush=True)
    expand_vocab(base, emap["pieces"], cfg.init, cfg.seed)
    export_folder(base, tok_dir, init_dir)
    write_json(init_dir / "DONE.json", {"base_bpb": scores, "n_old_rows": emap["base_vocab_size"],
                                        "vocab_size": base.cfg.vocab_size})
