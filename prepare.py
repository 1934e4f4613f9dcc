"""Before training: the held-out texts, the merged tokenizer, the expanded EEVE-initialised model.

Rank 0 runs them (bori.run_all) while the other ranks wait. Each writes its folder's DONE.json
last and is skipped once that exists, so a killed run redoes at most the stage it was in.

    python prepare.py --out DIR [--lang ko|ja|vi] [--train FILES...] [--new-tokens 8981]

builds a merged tokenizer alone and prints how it compresses held-out text: a quick look at
what a new language's rule (tokenizer.SCRIPTS) and its corpus give before a whole run.
EEVE init: Kim et al. 2024, arXiv:2402.14714.
"""
import argparse
import dataclasses
import hashlib
import json
import sys
import time
from pathlib import Path

from tokenizers import Tokenizer

import data
import distill
import tokenizer
from atomic import atomic_dir, disk_errors, read_json, write_json, write_text
from checkpoint import export_folder, read_done, write_done
from distributed import on_each_rank, on_master
from errors import about, warn
from evaluate import evaluate, print_tokenizer_report, tokenizer_report
from hf_io import from_pretrained
from inputs import OFFLINE_BASE, check_merged_tokenizer, resolve_base
from model import drop_padding_rows, expand_vocab
from probes import Pair, make_probes, same_length


# ----------------------------------------------------------------------------------------------
# The held-out texts and the BPE's training text

# English letters: ASCII and Latin-1 to Latin Extended-B (the new languages' are tokenizer.SCRIPTS)
LATIN = [(0x41, 0x5A), (0x61, 0x7A), (0xC0, 0x24F)]
# Below these shares of its letters in its script, a corpus is not in its language: Korean text
# holds ~88% Hangul, Vietnamese ~29% letters with its diacritics, English ~100% Latin; Korean
# text given as English holds ~12% Latin, French given as Vietnamese ~3% of those diacritics
MIN_SCRIPT_SHARE = {"latin": 0.5}
MIN_SCRIPT_SHARE_NEW = 0.05
SCRIPT_CHECK_LETTERS = 10_000  # a few documents: enough to tell languages apart


def check_script(flag: str, texts, corpus):
    """The first SCRIPT_CHECK_LETTERS letters of texts are mostly in the corpus's script:
    swapped options (--data_en given Korean) or text in another encoding fail now, not after
    a whole run."""
    if not corpus.script:
        return
    ranges = LATIN if corpus.script == "latin" else tokenizer.SCRIPTS[corpus.script][1]
    letters = inside = 0
    for text in texts:
        for c in filter(str.isalpha, text):
            letters += 1
            inside += any(lo <= ord(c) <= hi for lo, hi in ranges)
        if letters >= SCRIPT_CHECK_LETTERS:
            break
    share = inside / max(letters, 1)
    if letters and share < MIN_SCRIPT_SHARE.get(corpus.script, MIN_SCRIPT_SHARE_NEW):
        raise ValueError(f"--{flag}: only {share:.1%} of its first {letters:,} letters are "
                         f"{corpus.script}: is it {data.language_name(corpus.name)} text, in "
                         "UTF-8? (check the options' order, --lang and unicode_script)")


def eval_sets(corpora: list, eval_bytes: int, text_field: str, is_master: bool = True) -> tuple:
    """(the held-out texts per language, the text_keys of every example they took): the first
    eval_bytes of each corpus's held-out source (corpora: bori.sources(cfg))."""
    # The first documents, the same on every run and rank: a fixed set, so a resumed run and
    # the base line are scored on identical text. Every training stream and the BPE leave out
    # examples with these keys (English defaults to the replay's own fineweb-edu): held out by
    # content on every rank, whichever source holds them and however its path is spelled.
    evals, keys = {}, set()
    for corpus in corpora:
        with about(corpus.held_out_flag):
            evals[corpus.name], taken = data.eval_docs(corpus.held_out, eval_bytes, text_field,
                                                       keys=True)
        check_script(corpus.held_out_flag, evals[corpus.name], corpus)
        keys |= taken
        size = sum(len(t.encode()) for t in evals[corpus.name])
        if size < eval_bytes * 0.9 and is_master:  # 10%: a document boundary's slack
            warn(f"--{corpus.held_out_flag} holds only {size:,} of the {eval_bytes:,} bytes "
                 "asked for (eval_bytes): its bits per byte are measured on less text")
    return evals, frozenset(keys)


def probe_texts(corpora: list, probe_bytes: int, text_field: str) -> tuple:
    """({language: texts}, their text_keys): the first probe_bytes of each held-out source, which
    the grammar probes are made from (by the tokenizer stage: make_run_probes), and which
    training and the BPE then leave out as they do the eval texts."""
    texts, keys = {}, set()
    for corpus in corpora if probe_bytes else []:  # probe_bytes=0: no probes
        with about(corpus.held_out_flag):
            texts[corpus.name], taken = data.eval_docs(corpus.held_out, probe_bytes, text_field,
                                                       keys=True)
        keys |= taken
    return texts, frozenset(keys)


def check_training_text(corpora: list, held_out: frozenset, text_field: str):
    """Each local training source is text of its language and holds text that is not held
    out: a source that is its own eval source and too small for more than the held-out set
    fails now, in one sentence, not when its phase first reads it (hub sources are large and
    are not read ahead)."""
    for corpus in corpora:
        if corpus.train.startswith("hf:"):
            continue
        check_script(corpus.train_flag, data.iter_texts([corpus.train], text_field), corpus)
        with about(corpus.train_flag):
            if all(data.text_key(text) in held_out or not text.strip()
                   for text in data.iter_texts([corpus.train], text_field)):
                raise ValueError(f"all of the text of {corpus.train} is held out for "
                                 f"evaluation (--{corpus.held_out_flag} reads it too); give "
                                 "it more documents or hold out other text")


def bpe_training_text(run):
    """The first tokenizer_bytes (0: all) of the new language's text the BPE is trained on:
    tokenizer_data, or else the new language's training source."""
    cfg, new_language = run.cfg, run.corpora[0]
    flag = "tokenizer_data" if cfg.tokenizer_data else new_language.train_flag
    return training_text(run, cfg.tokenizer_data or new_language.train, cfg.tokenizer_bytes,
                         flag)


def training_text(run, path: str, limit: int, flag: str):
    """The first limit bytes (0: all) of path's text, held-out documents left out: the BPE's
    and token distillation's text (flag: the setting that names path)."""
    total = 0
    with about(flag):
        for text in data.iter_texts([path], run.cfg.text_field, progress=True):
            # reading 100 MB from the hub takes a while: a SIGTERM stops it here, not after
            run.check_stop("the text was read")
            if data.text_key(text) in run.held_out:  # never held-out text
                continue
            raw = text.encode("utf-8")
            if limit and total + len(raw) >= limit:  # cut the last
                # the limit holds inside one huge document too; a character the cut splits
                # is dropped rather than decoded as U+FFFD
                yield raw[:limit - total].decode("utf-8", errors="ignore")
                return
            yield text
            total += len(raw)
    if total == 0:
        raise ValueError(f"--{flag}: {path!r} has no text that is not held out; point it at "
                         "text of the new language")


# ----------------------------------------------------------------------------------------------
# The two stages before training (rank 0; each skipped once its DONE.json exists)

def stage_tokenizer(run, base_dir: Path):
    """out_dir/tokenizer: the merged tokenizer, its EEVE map, and how it compresses held-out
    text against the base and the standalone BPE (report.json)."""
    tok_dir = run.out / "tokenizer"
    if (tok_dir / "DONE.json").is_file():
        done = read_done(tok_dir)  # its files are still what it wrote
        check_same_held_out(run, done.get("held_out", held_out_digests(run)))
        return
    # whole or not at all: a kill or a full disk mid-stage leaves no half tokenizer to trust
    with disk_errors(tok_dir), atomic_dir(tok_dir) as tmp:
        done = tokenizer.build(base_dir, tmp, bpe_training_text(run), n_new=run.cfg.new_tokens,
                               script=run.cfg.unicode_script)
        # measured on the held-out texts, never the BPE's own training text
        report = tokenizer_report(base_dir, tmp, run.evals)
        print_tokenizer_report(report)
        print(f"merged {done['new_tokens']:,} tokens; the rule: {done['rule']}; "
              "the standalone BPE's tokens turned away: "
              + ", ".join(f"{n:,} {why}" for why, n in done["rejected"].items()), flush=True)
        write_json(tmp / "report.json", report)
        probes = make_run_probes(run, merged=Tokenizer.from_file(str(tmp / "tokenizer.json")),
                                 base=Tokenizer.from_file(str(base_dir / "tokenizer.json")))
        write_probes(tmp / "probes.jsonl", probes)  # read by every score and lm_eval_tasks.py
        # last: DONE.json is the stage's proof it finished
        write_done(tmp, {**done, **report, "held_out": held_out_digests(run),
                         "probes": {name: len(pairs) for name, pairs in probes.items()}})


def make_run_probes(run, merged, base) -> dict:
    """The grammar probes (probes.py) of each language's probe texts: pairs whose two sides the
    merged tokenizer writes in as many tokens, so that no model scored with it wins a pair by
    the tokenizer's token counts alone. The base model's line is scored with its own tokenizer,
    which can count them differently: how often, and which way, is printed."""
    probes = {}
    for lang, texts in run.probe_texts.items():
        probes.update(make_probes(lang, texts, seed=0, max_pairs=run.cfg.probe_pairs,
                                  keep=same_length(merged)))
    for name, pairs in probes.items():
        count = [len(base.encode(p.context + side, add_special_tokens=False).ids)
                 for p in pairs for side in (p.good, p.bad)]
        shorter = sum(g < b for g, b in zip(count[::2], count[1::2]))
        longer = sum(g > b for g, b in zip(count[::2], count[1::2]))
        print(f"{name} probe: {len(pairs):,} pairs (as many merged tokens on both sides); the "
              f"base tokenizer writes the original in fewer tokens in {shorter:,}, in more in "
              f"{longer:,}", flush=True)
    return probes


def write_probes(path: Path, probes: dict):
    """The grammar probes' pairs, one JSON object per line: {probe, context, good, bad}."""
    write_text(path, "".join(json.dumps({"probe": name, **dataclasses.asdict(pair)},
                                        ensure_ascii=False) + "\n"
                             for name, pairs in probes.items() for pair in pairs))


def read_probes(tok_dir: Path) -> dict:
    """{probe name: pairs} as the tokenizer stage wrote them."""
    probes, path = {}, tok_dir / "probes.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; delete {tok_dir} to rebuild it")
    for line in path.read_text(encoding="utf-8").splitlines():
        fields = json.loads(line)
        probes.setdefault(fields.pop("probe"), []).append(Pair(**fields))
    return probes


def held_out_digests(run) -> dict:
    """{language or probe texts: a digest of its held-out texts}: what every score of the run is
    measured on."""
    texts = {**run.evals, **{f"{lang}_probes": t for lang, t in run.probe_texts.items()}}
    return {name: hashlib.sha256("\x00".join(t).encode()).hexdigest()[:16]
            for name, t in texts.items()}


def check_same_held_out(run, recorded: dict):
    """The held-out texts are those the run began with: an eval file edited (or its hub
    dataset updated) between two commands would score the rest of the run on other text
    than its base line, and hold out documents that training or the BPE may have read."""
    now = held_out_digests(run)
    for corpus in run.corpora:
        names = [name for name in now if name == corpus.name or name.startswith(corpus.name + "_")]
        if any(recorded.get(name, now[name]) != now[name] for name in names):
            raise ValueError(f"--{corpus.held_out_flag}: its first eval_bytes of text are not "
                             "what this run began with (the base line and every score so far "
                             "were measured on them, and the BPE and training left them out); "
                             f"restore {corpus.held_out}, or use a new out_dir")


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
    check_merged_tokenizer(base_dir, base_tok, n_rows=base.cfg.vocab_size, tok_dir=tok_dir,
                           emap=emap)
    # The reference line: the base model with its own tokenizer, before any row is added.
    # Bits per byte compare across tokenizers (0.53 vs 3 Korean characters per token), so every
    # later score is read against this one. A rerun after a kill here logs it only once.
    run.metrics.truncate_after("base", 0)
    headroom = []
    scores = evaluate(base, base_tok, run.evals, seq_len=cfg.seq_len, device=run.env.device,
                      ctx=run.ctx, headroom=headroom, probes=read_probes(tok_dir))
    # fp16_peak: each layer's largest activation over fp16's 65,504, the base's own headroom
    run.metrics.log(kind="eval", phase="base", step=0, **scores,
                    fp16_peak=[round(p, 4) for p in headroom])
    print("base model: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()), flush=True)
    # each new row: the mean of its base pieces' rows (EEVE); with SmolLM2's tied head it is
    # the token's output row as well
    drop_padding_rows(base, emap["base_vocab_size"])  # a padded base: new ids follow its tokens
    expand_vocab(base, emap["pieces"], "eeve" if cfg.init == "distill" else cfg.init, cfg.seed)
    export_folder(base, tok_dir, init_dir)
    write_done(init_dir, {"base_bpb": scores, "n_old_rows": emap["base_vocab_size"],
                          "vocab_size": base.cfg.vocab_size})


def stage_distill(run) -> Path:
    """out_dir/distill (every rank, init=distill): the init model's new rows fitted by token
    distillation (distill.py) on the first distill_bytes of the new language's training text;
    its model folder, for Phase 1A to start from. Skipped once its DONE.json exists."""
    folder, init_dir = run.out / "distill", run.out / "init"
    if (folder / "DONE.json").is_file():
        read_done(folder)
        return folder / "init"
    started, s, corpus = time.time(), distill.settings(run.cfg), run.corpora[0]
    tok = Tokenizer.from_file(str(run.out / "tokenizer" / "tokenizer.json"))
    n_old = read_json(init_dir / "DONE.json", f"delete {init_dir}")["n_old_rows"]
    texts = training_text(run, corpus.train, run.cfg.distill_bytes, corpus.train_flag)
    found = distill.windows(texts, tok, tok.token_to_id(data.EOS_TOKEN), n_old, s)
    if not found and run.env.is_master:
        warn(f"no new token occurs in the first {run.cfg.distill_bytes:,} bytes of "
             f"--{corpus.train_flag} (distill_bytes): distill/init keeps EEVE's rows")
    (folder / "groups").mkdir(parents=True, exist_ok=True)
    on_each_rank(run.env, distill.fit_my_groups, run, s, init_dir, folder / "groups",
                 list(found), found)
    n_groups = -(-len(found) // distill.GROUP_TOKENS)
    on_master(run.env, distill.assemble, run, init_dir, folder, n_groups, started)
    return folder / "init"


def prepare_model(run):
    """Rank 0: the base model found and checked, the merged tokenizer, the expanded model."""
    base_dir = resolve_base(run.cfg.base, seq_len=run.cfg.seq_len)  # before any stage's work
    stage_tokenizer(run, base_dir)
    stage_init(run, base_dir)


# ----------------------------------------------------------------------------------------------
# The tokenizer stage alone, from the command line

def main(argv=None):
    """The tokenizer stage alone, on the bundled corpus or given files."""
    p = argparse.ArgumentParser(description="Train a BPE of a new language and merge it into a "
                                "base tokenizer.")
    p.add_argument("--base", default=OFFLINE_BASE, help="base model folder, hub id or GGUF")
    p.add_argument("--out", required=True, help="folder for the merged tokenizer")
    p.add_argument("--lang", default="ko", choices=sorted(data.LANGUAGES),
                   help="the new language: its script rule and bundled corpus (default: ko)")
    p.add_argument("--train", nargs="*", help="its text files (default: the bundled corpus)")
    p.add_argument("--eval", nargs="*", help="its held-out files for the report")
    p.add_argument("--new-tokens", type=int, default=tokenizer.REFERENCE_NEW_TOKENS,
                   help="how many")
    args = p.parse_args(argv)
    script = data.LANGUAGES[args.lang].script
    try:
        base_dir = resolve_base(args.base)
        train = data.iter_texts(args.train or [data.BUNDLED[f"{args.lang}_train"]], progress=True)
        done = tokenizer.build(base_dir, args.out, train, n_new=args.new_tokens, script=script)
        # English is always scored: the merge must leave its tokenization exactly as it was
        evals = {args.lang: list(data.iter_texts(args.eval or
                                                 [data.BUNDLED[f"{args.lang}_eval"]])),
                 "en": list(data.iter_texts([data.BUNDLED["en_eval"]]))}
        report = tokenizer_report(base_dir, args.out, evals)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    print_tokenizer_report(report)
    print(f"the rule: {done['rule']}; turned away: {done['rejected']}")
    print(f"wrote {args.out}/tokenizer.json, eeve_map.json")


if __name__ == "__main__":
    main()
