"""Does the method work? The seed's claims measured on the real SmolLM2-135M, on a CPU.

    python experiments.py [--lang ko] [--out runs/experiments] [--steps_1a 40] [--steps_1b 60]

1. Step-0 bits per byte of the new language (Korean unless --lang says otherwise) and English:
   the base model (base tokenizer), and the expanded model with EEVE, EEVE + token distillation,
   mean and random init of the new rows (merged tokenizer).
2. The same after an equally short Phase 1A for each init; then, from EEVE's Phase 1A, an
   equally short Phase 1B with and without the 10% English replay, and from distill's with it.
3. Tokens per character of the new language, and generation speed in tokens and characters per
   second.
4. The grammar probes (probes.py) at each of those points.
Everything else is the language's demo preset (bundled corpora, seq 256, fixed seeds). Writes a
table, a PNG next to the JSON, and JSON with the keys the README's Results section quotes.
EEVE: Kim et al. 2024, arXiv:2402.14714. About 37 minutes on 2 CPU cores for Korean (README).
"""
import argparse
import dataclasses
import json
import shutil
import threading
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer

import bori
from inputs import resolve_base
from data import LANGUAGES, language_name
from distributed import DistEnv
from hf_io import from_pretrained
from prepare import (eval_sets, probe_texts, read_probes, stage_distill, stage_init,
                     stage_tokenizer)
from runlog import Metrics

# EEVE, EEVE then token distillation (distill.py), and two simpler inits of the new rows
# (model.expand_vocab): the mean of all base rows, and random rows with the base rows' spread;
# only the init differs between their runs
INITS = ("eeve", "distill", "mean", "random")

# Phase 1B from EEVE's Phase 1A with and without the English replay, and from distill's with it
ONE_B = ("replay", "no_replay", "distill_replay")


# ----------------------------------------------------------------------------------------------
# The runs: one Phase 1A per init, then Phase 1B with and without the English replay

def evals_of(out: Path, phase: str) -> list:
    """A run's eval records of one phase, in step order (the first at step 0)."""
    return [r for r in map(json.loads, open(out / "metrics.jsonl"))
            if r["kind"] == "eval" and r["phase"] == phase]


def make_run(cfg, out: Path) -> bori.Run:
    """A one-process bori.Run writing to out, with cfg's held-out texts."""
    # one process, rank 0: the Metrics is enabled, and the stop event is never set
    cfg = dataclasses.replace(cfg, out_dir=str(out))
    out.mkdir(parents=True, exist_ok=True)
    evals, held_out = eval_sets(bori.sources(cfg), cfg.eval_bytes, cfg.text_field)
    texts, probe_keys = probe_texts(bori.sources(cfg), cfg.probe_bytes, cfg.text_field)
    run = bori.Run(cfg, DistEnv(), metrics=Metrics(out / "metrics.jsonl", True), evals=evals,
                   stop=threading.Event(), held_out=held_out | probe_keys, probe_texts=texts)
    if (out / "tokenizer" / "DONE.json").is_file():  # the probes are the tokenizer stage's
        run.probes = read_probes(out / "tokenizer")
    return run


def run_init(cfg, root: Path, init: str, base_dir: Path) -> Path:
    """Tokenizer (shared), expansion with `init`, then Phase 1A, in root/init."""
    out = root / init
    # one tokenizer for all three, copied: the runs differ in the new rows' init alone, and a
    # rerun skips what is done (each stage's DONE.json)
    if not (out / "tokenizer").is_dir():
        shutil.copytree(root / "tokenizer", out / "tokenizer")
    run = make_run(dataclasses.replace(cfg, init=init), out)
    stage_init(run, base_dir)  # logs the base model's line, then expands with `init`
    n_old = json.loads((out / "init" / "DONE.json").read_text())["n_old_rows"]
    start = stage_distill(run) if init == "distill" else out / "init"
    bori.run_phase(run, run.phases[0], start_dir=start, tok=bori_tokenizer(out),
                   n_old_rows=n_old)
    return out


def run_1b(cfg, root: Path, name: str, mix: str, init: str = "eeve") -> Path:
    """Phase 1B from init's Phase 1A (model and data position), with the given mix."""
    out, first = root / name, bori.recipe(cfg)[0]
    # Both Phase 1B runs start from one Phase 1A, its data position included, so the replay
    # is the only difference; the log is copied so that the base line and 1A's evals come along.
    if not (out / first.folder).is_dir():
        shutil.copytree(root / init / "tokenizer", out / "tokenizer")
        shutil.copytree(root / init / first.folder, out / first.folder)
        shutil.copy(root / init / "metrics.jsonl", out / "metrics.jsonl")
    run = make_run(dataclasses.replace(cfg, mix_1b=mix), out)
    n_old = json.loads((root / init / "init" / "DONE.json").read_text())["n_old_rows"]
    bori.run_phase(run, run.phases[1], start_dir=out / first.folder / "model",
                   tok=bori_tokenizer(out), n_old_rows=n_old)
    return out


def bori_tokenizer(out: Path):
    """The merged tokenizer of the run in out."""
    return Tokenizer.from_file(str(out / "tokenizer" / "tokenizer.json"))


# ----------------------------------------------------------------------------------------------
# Generation speed, the plot and the table

@torch.no_grad()
def generation_speed(folder: Path, tok, prompts: list, chars_per_token: float,
                     n: int = 128) -> dict:
    """Greedy generation of n tokens after each prompt: tokens/s over all of them, and
    characters/s derived as tokens/s x the held-out text's characters per token with this
    tokenizer. Derived, not counted: a sample's own characters depend on what it happens to
    write (one 48-token sample once gave exactly 48 characters)."""
    model = from_pretrained(folder).eval()
    model.generate(torch.tensor([tok.encode(prompts[0]).ids]), 4, temperature=0)  # warm-up
    tokens, seconds = 0, 0.0
    for prompt in prompts:
        idx = torch.tensor([tok.encode(prompt).ids])
        t0 = time.perf_counter()
        # greedy: no sampling noise, and both models do the same work per token
        out = model.generate(idx, n, temperature=0)
        seconds += time.perf_counter() - t0
        tokens += out.shape[1] - idx.shape[1]
    return {"tokens_per_s": tokens / seconds, "chars_per_token": chars_per_token,
            "chars_per_s": tokens / seconds * chars_per_token, "tokens": tokens}


def plot(results: dict, runs: dict, path: Path, lang: str, phases: list):
    """Phase 1A curves of the new language per init; Phase 1B's English with and without
    the replay, against the base and the base + 5% bound."""
    try:  # without matplotlib the table and the JSON still carry every number
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    for init in INITS:
        pts = [(r["step"], r[f"{lang}_bpb"]) for r in evals_of(runs[init], phases[0].name)]
        a.plot(*zip(*pts), "o-", ms=3, label=f"{init} init")
    a.axhline(results[f"base_{lang}_bpb"], color="grey", ls="--", label="base model")
    a.set(title=f"{language_name(lang)} bits/byte during Phase 1A", xlabel="step",
          ylabel="bits per byte")
    for name, color in (("replay", "tab:green"), ("no_replay", "tab:red")):
        pts = [(r["step"], r["en_bpb"]) for r in evals_of(runs[name], phases[1].name)]
        b.plot(*zip(*pts), "o-", ms=3, color=color, label=f"Phase 1B, {name.replace('_', ' ')}")
    b.axhline(results["base_en_bpb"], color="grey", ls="--", label="base model")
    # 5%: the bound README's Results reads "without catastrophic destruction" of English by
    b.axhline(results["base_en_bpb"] * 1.05, color="grey", ls=":", label="base + 5%")
    b.set(title="English bits/byte during Phase 1B", xlabel="step", ylabel="bits per byte")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def print_table(res: dict, lang: str):
    """The results as the README's Results table, then drift, tokens and generation speed."""
    name = language_name(lang)
    print(f"{'bits per byte':<28}{name:>11}{'English':>9}")
    rows = [("base model", f"base_{lang}_bpb", "base_en_bpb", None)]
    for i in INITS:
        rows += [(f"{i}, step 0", f"step0_{lang}_bpb", "step0_en_bpb", i),
                 (f"{i}, after 1A", f"after_1a_{lang}_bpb", "after_1a_en_bpb", i)]
    rows += [(f"1B {n.replace('_', ' ')}", f"after_1b_{lang}_bpb", "after_1b_en_bpb", n)
             for n in ONE_B]
    for label, new, en, key in rows:
        k, e = (res[new], res[en]) if key is None else (res[new][key], res[en][key])
        print(f"{label:<28}{k:>11.4f}{e:>9.4f}")
    print(f"English drift after 1B: replay {res['en_drift_after_1b']['replay']:+.1%}, "
          f"no replay {res['en_drift_after_1b']['no_replay']:+.1%}")
    for probe, scores in res["probes"].items():  # ± the 95% interval of each accuracy
        n = res["probe_pairs"][probe]
        print(f"{probe} probe ({n} pairs): " + ", ".join(
            f"{at} {acc:.1%}±{1.96 * (acc * (1 - acc) / n) ** 0.5:.1%}"
            for at, acc in scores.items()))
    t = res[f"{lang}_tokens_per_char"]
    g = res["generation"]
    print(f"{name} tokens per character: base {t['base']:.3f}, merged {t['merged']:.3f}")
    print(f"greedy generation, {g['base']['tokens']} tokens: tokens/s base "
          f"{g['base']['tokens_per_s']:.1f}, merged {g['merged']['tokens_per_s']:.1f}; "
          f"characters/s (tokens/s x held-out characters per token) base "
          f"{g['base']['chars_per_s']:.1f}, merged {g['merged']['chars_per_s']:.1f} "
          f"({g['merged']['chars_per_s'] / g['base']['chars_per_s']:.1f}x)")


# ----------------------------------------------------------------------------------------------
# main: the runs, the numbers, the files

def results(cfg, args, runs: dict, root: Path, phases: list) -> dict:
    """The numbers of the README's Results, read back from each run's metrics.jsonl."""
    lang, (first, second) = cfg.lang, phases
    # each init's run scores the base on the same texts; EEVE's record stands for all three
    base = evals_of(runs["eeve"], "base")[0]
    res = {f"base_{lang}_bpb": base[f"{lang}_bpb"], "base_en_bpb": base["en_bpb"], "settings": {
        "lang": lang, "new_tokens": cfg.new_tokens,
        "steps_1a": args.steps_1a, "steps_1b": args.steps_1b, "seq_len": cfg.seq_len,
        "batch_tokens": cfg.batch_tokens, "lr_1a": cfg.lr_1a, "lr_1b": cfg.lr_1b,
        "eval_bytes": cfg.eval_bytes}}
    # step 0 is Phase 1A's first eval, before any update: the init alone; [-1] is the last
    for code in (lang, "en"):
        res[f"step0_{code}_bpb"] = {"base": base[f"{code}_bpb"], **{
            i: evals_of(runs[i], first.name)[0][f"{code}_bpb"] for i in INITS}}
        res[f"after_1a_{code}_bpb"] = {i: evals_of(runs[i], first.name)[-1][f"{code}_bpb"]
                                       for i in INITS}
        res[f"after_1b_{code}_bpb"] = {n: evals_of(runs[n], second.name)[-1][f"{code}_bpb"]
                                       for n in ONE_B}
    # the grammar probes: the base, each init at step 0 and after 1A, each 1B at its end
    names = [k[:-4] for k in base if k.endswith("_acc")]
    res["probes"] = {name: {
        "base": base[f"{name}_acc"],
        **{f"{i}, step 0": evals_of(runs[i], first.name)[0][f"{name}_acc"] for i in INITS},
        **{f"{i}, after 1A": evals_of(runs[i], first.name)[-1][f"{name}_acc"] for i in INITS},
        **{f"1B {n.replace('_', ' ')}": evals_of(runs[n], second.name)[-1][f"{name}_acc"]
           for n in ONE_B}} for name in names}
    res["probe_pairs"] = json.loads((root / "tokenizer" / "DONE.json").read_text())["probes"]
    # English relative to the base: the replay's claim is that this stays small
    res["en_drift_after_1b"] = {n: v / res["base_en_bpb"] - 1
                                for n, v in res["after_1b_en_bpb"].items()}
    # the tokenizer stage's own report on the held-out text: tokens per character both ways
    report = json.loads((root / "tokenizer" / "DONE.json").read_text())[lang]
    res[f"{lang}_tokens_per_char"] = {t: 1 / report[t]["chars_per_token"]
                                      for t in ("base", "merged")}
    return res


def main(argv=None):
    """Run the experiments for --lang and write the JSON, the PNG and the table."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lang", default="ko", choices=sorted(LANGUAGES))
    p.add_argument("--out", help="default: runs/experiments, or runs/experiments-LANG")
    # 40 and 60 steps of 512 tokens: about 20K tokens a phase, the README's Results
    p.add_argument("--steps_1a", type=int, default=40)
    p.add_argument("--steps_1b", type=int, default=60)
    p.add_argument("--json", help="default: OUT/results.json")
    args = p.parse_args(argv)
    lang = args.lang
    root = Path(args.out or "runs/experiments" + ("" if lang == "ko" else f"-{lang}"))
    # The language's demo preset, with the decay the seed's last 20% of each phase, an eval
    # every 10 steps for the curves, and ckpt_every past the last step: a phase this short is
    # redone rather than resumed (a finished one is still skipped, by its DONE.json).
    cfg = bori.load_config(bori.Config, bori.PRESETS, [
        f"--preset=demo-{lang}", f"--out_dir={root}", f"--steps_1a={args.steps_1a}",
        f"--decay_1a={args.steps_1a // 5}", f"--steps_1b={args.steps_1b}",
        f"--decay_1b={args.steps_1b // 5}", "--eval_every=10", "--ckpt_every=1000"])
    torch.manual_seed(cfg.seed)  # fixed seeds: a rerun reproduces the table
    phases = bori.recipe(cfg)
    base_dir = resolve_base(cfg.base)
    stage_tokenizer(make_run(cfg, root), base_dir)  # once, in root; each run copies it
    runs = {init: run_init(cfg, root, init, base_dir) for init in INITS}
    runs["replay"] = run_1b(cfg, root, "replay", f"{lang}=0.9,en=0.1")
    runs["no_replay"] = run_1b(cfg, root, "no_replay", f"{lang}=1.0")
    runs["distill_replay"] = run_1b(cfg, root, "distill_replay", f"{lang}=0.9,en=0.1",
                                    init="distill")
    res = results(cfg, args, runs=runs, root=root, phases=phases)
    prompts = LANGUAGES[lang].prompts.split("|")[:2]  # the language's own, not English
    # the base model with its own tokenizer against the final replay model with the merged one
    chars = {t: 1 / res[f"{lang}_tokens_per_char"][t] for t in ("base", "merged")}
    res["generation"] = {
        "base": generation_speed(base_dir, Tokenizer.from_file(str(base_dir / "tokenizer.json")),
                                 prompts, chars["base"]),
        "merged": generation_speed(runs["replay"] / phases[1].folder / "model",
                                   bori_tokenizer(runs["replay"]), prompts, chars["merged"])}
    print_table(res, lang)
    json_path = Path(args.json or root / "results.json")
    json_path.write_text(json.dumps(res, indent=2))
    plot(res, runs, path=json_path.with_suffix(".png"), lang=lang, phases=phases)
    print(f"wrote {json_path} and {json_path.with_suffix('.png')}")
    return res


if __name__ == "__main__":
    main()
