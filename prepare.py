"""Before training: the held-out texts, the merged tokenizer, the expanded EEVE-initialised model.

Rank 0 runs them (bori.run_all) while the other ranks wait. Each writes its folder's DONE.json
last and is skipped once that exists, so a killed run redoes at most the stage it was in.
"""
import os
from pathlib import Path

from tokenizers import Tokenizer

import data
import tokenizer
from atomic import atomic_dir, disk_errors, write_json
from base_model import check_base, check_merged_tokenizer, resolve_base
from checkpoint import export_folder, read_done, read_json, write_done
from errors import warn
from evaluate import evaluate, print_tokenizer_report, tokenizer_report
from hf_io import from_pretrained
from model import expand_vocab


def eval_sets(cfg) -> dict:
    """The held-out texts per language: the first eval_bytes of each eval source."""
    evals = {}
    for lang, flag in ((cfg.lang, "eval_new"), ("en", "eval_en")):
        try:
            evals[lang] = data.eval_docs(getattr(cfg, flag), cfg.eval_bytes, cfg.text_field)
        except ValueError as e:  # say which flag names it
            raise type(e)(f"--{flag}: {e}") from None
        size = sum(len(t.encode()) for t in evals[lang])
        if size < cfg.eval_bytes * 0.9 and int(os.environ.get("RANK", 0)) == 0:
            warn(f"--{flag} holds only {size:,} of the {cfg.eval_bytes:,} bytes asked "
                 "for (eval_bytes): its bits per byte are measured on less text")
    return evals


def bpe_training_text(run):
    """The first tokenizer_bytes (0: all) of the new language's text the BPE is trained on."""
    cfg, total = run.cfg, 0
    path = cfg.tokenizer_data or cfg.data_new
    try:
        for text in data.iter_texts([path], cfg.text_field, progress=True):
            run.check_stop("the tokenizer was trained")
            raw = text.encode("utf-8")
            if cfg.tokenizer_bytes and total + len(raw) >= cfg.tokenizer_bytes:  # cut the last
                yield raw[:cfg.tokenizer_bytes - total].decode("utf-8", errors="ignore")
                return
            yield text
            total += len(raw)
    except ValueError as e:  # say which flag names the broken source
        raise type(e)(f"--{'tokenizer_data' if cfg.tokenizer_data else 'data_new'}: {e}") \
            from None
    if total == 0:
        raise ValueError(f"tokenizer data {path!r} has no text; point data_new (or "
                         "tokenizer_data) at text of the new language")


def stage_tokenizer(run, base_dir: Path):
    """out_dir/tokenizer: the merged tokenizer, its EEVE map, and how it compresses held-out
    text against the base and the standalone BPE (report.json)."""
    tok_dir = run.out / "tokenizer"
    if (tok_dir / "DONE.json").is_file():
        read_done(tok_dir)  # its files are still what it wrote
        return
    with disk_errors(tok_dir), atomic_dir(tok_dir) as tmp:
        done = tokenizer.build(base_dir, tmp, bpe_training_text(run), run.cfg.new_tokens,
                               run.cfg.unicode_script)
        report = tokenizer_report(base_dir, tmp, run.evals)
        print_tokenizer_report(report)
        print(f"merged {done['new_tokens']:,} tokens; the rule: {done['rule']}; "
              "the standalone BPE's tokens turned away: "
              + ", ".join(f"{n:,} {why}" for why, n in done["rejected"].items()), flush=True)
        write_json(tmp / "report.json", report)
        write_done(tmp, {**done, **report})


def stage_init(run, base_dir: Path):
    """out_dir/init: the base model's held-out bits per byte (the reference line), then the
    model with its embedding grown by one EEVE-initialised row per new token."""
    cfg, init_dir, tok_dir = run.cfg, run.out / "init", run.out / "tokenizer"
    if (init_dir / "DONE.json").is_file():
        read_done(init_dir)
        return
    run.check_stop("the init stage")
    base = from_pretrained(base_dir).to(run.env.device)
    base_tok = Tokenizer.from_file(str(base_dir / "tokenizer.json"))
    emap = read_json(tok_dir / "eeve_map.json", f"delete {tok_dir} to rebuild it")
    check_merged_tokenizer(base_dir, base_tok, base.cfg.vocab_size, tok_dir, emap)
    run.metrics.truncate_after("base", 0)
    headroom = []
    scores = evaluate(base, base_tok, run.evals, cfg.seq_len, run.env.device, run.ctx,
                      headroom=headroom)
    run.metrics.log(kind="eval", phase="base", step=0, **scores,
                    fp16_peak=[round(p, 4) for p in headroom])
    print("base model: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()), flush=True)
    expand_vocab(base, emap["pieces"], cfg.init, cfg.seed)
    export_folder(base, tok_dir, init_dir)
    write_done(init_dir, {"base_bpb": scores, "n_old_rows": emap["base_vocab_size"],
                          "vocab_size": base.cfg.vocab_size})


def prepare_model(run):
    """Rank 0: the base model found and checked, the merged tokenizer, the expanded model."""
    base_dir = resolve_base(run.cfg.base)
    check_base(base_dir, run.cfg.seq_len)
    stage_tokenizer(run, base_dir)
    stage_init(run, base_dir)
