"""What a run writes as it goes: metrics.jsonl (one JSON record per line), the same numbers to
TensorBoard or Weights & Biases when asked, and the progress line people watch.

    metrics = Metrics(out / "metrics.jsonl", enabled=env.is_master)
    with Progress(metrics, phase=phase.name, steps=phase.steps, step=0, ...) as progress:

Rank 0 writes; the other ranks hold a disabled Metrics. A resumed run first drops what the
killed one logged after its checkpoint (truncate_after), so no record appears twice.
"""
import dataclasses
import json
import math
import secrets
import sys
import time
from pathlib import Path

from tqdm import tqdm

from atomic import disk_errors, read_json, write_text
from errors import warn


# ----------------------------------------------------------------------------------------------
# metrics.jsonl: the run's record, and what the plot, the card and the summary read back

class Metrics:
    """metrics.jsonl, one JSON record per line with its time, written by rank 0; with a sink,
    every number also goes to TensorBoard or Weights & Biases."""

    def __init__(self, path: Path, enabled: bool, sink=None):
        self.path, self.enabled, self.sink = path, enabled, sink

    def log(self, **record):
        """Append one record, stamped with its wall time (a no-op on ranks other than 0)."""
        if self.enabled:
            record["time"] = round(time.time(), 1)
            # appended and closed per record: a kill cuts at most the last line, which
            # read_records drops; ensure_ascii=False keeps Korean readable in the file
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
        with disk_errors(self.path):  # atomic: a kill mid-rewrite leaves the old log whole
            write_text(self.path, "".join(json.dumps(r, ensure_ascii=False) + "\n"
                                          for r in keep))


# ----------------------------------------------------------------------------------------------
# TensorBoard and Weights & Biases (--report_to)

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
                # one W&B run across resumes: the id lives in out_dir, as the run does
                id_file = out / "wandb_id.txt"
                if not id_file.is_file():
                    id_file.write_text(secrets.token_hex(4))  # wandb 0.31 dropped util.generate_id
                run_id = id_file.read_text().strip()
                self.writer = wandb.init(project="bori", name=out.name, id=run_id, dir=str(out),
                                         config=config, resume="allow")
        except ImportError:
            # neither is a requirement of bori: asked for without it installed, say what to do
            raise ValueError(f"report_to={kind} needs the {kind} package: pip install {kind}") \
                from None

    def log(self, record: dict):
        """A record's numbers as scalars named kind/key (train/loss, eval/en_bpb)."""
        # Phase 1B's step 0 follows Phase 1A's last: one x axis across phases
        step = record["step"] + self.offsets.get(record.get("phase"), 0)
        # bool is an int in Python: "skipped" is no curve; lists (fp16_peak) are not scalars
        values = {f"{record['kind']}/{k}": v for k, v in record.items()
                  if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}
        if self.kind == "tensorboard":
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, step)
        else:
            self.writer.log(values, step=step)

    def close(self):
        """Flush TensorBoard's buffered events, or mark the W&B run finished."""
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


# ----------------------------------------------------------------------------------------------
# What people watch: the progress bar or line, and the fp16 headroom warning

FP16_WARN = 0.5  # a peak above half of fp16's range leaves less than one doubling of headroom


def clock(seconds: float) -> str:
    """Seconds as H:M:S; gmtime would wrap at a day, so a longer time is in days."""
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
        # off a terminal a bar's carriage-return redraws would fill a notebook's saved log
        self.bar = tqdm(total=steps, initial=step, desc=f"phase {phase}",
                        disable=not (show and sys.stderr.isatty()))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.bar.close()

    def say(self, line: str):
        """A line above the bar (bar.write), so the bar is not torn in two."""
        if self.show:
            self.bar.write(line)

    def eval(self, step: int, scores: dict, fp16_peak: list, **extra):
        """Log an eval; warn when a layer's activations near fp16's largest number, 65,504."""
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
        """Log a step; show it every log_every steps, and always when GradScaler skipped it."""
        self.metrics.log(kind="train", phase=self.phase, step=step, **record)
        self.bar.update(1)
        if not (step % self.log_every == 0 or record["skipped"]):
            return
        r, elapsed = record, time.time() - self.t0
        # the rate of this invocation (a resumed run's clock starts at its checkpoint), times
        # the steps left in this phase and in the phases after it
        eta = elapsed / (step - self.start) * (self.steps - step + self.later)
        # nats per token / ln 2 / bytes per token: "~" as the bytes per token are held-out
        # text's, not this batch's; mfu is logged on CUDA only, against peak_tflops (a T4's 65)
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
    report = read_json(run / "tokenizer" / "DONE.json", f"delete {run / 'tokenizer'}")
    # 1.0 when the report names none of the mix's sources: the line then shows bits per token
    return sum(w * report[n]["merged"]["bytes_per_token"] for n, w in mix.items()
               if n in report) or 1.0


# ----------------------------------------------------------------------------------------------
# Reading the log back

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
        except ValueError:  # only the last line can be a kill's doing; any other is damage
            if n < len(lines):
                raise ValueError(f"{path} line {n} is not a JSON record; remove that line (the "
                                 "other records stay)") from None
    return out
