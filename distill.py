"""Token distillation: each new row fitted to what the base model computes from its pieces.

Dobler, Elliott & de Melo, "Token Distillation" (arXiv:2505.20133, ICLR 2026; code:
github.com/konstantinjdobler/token-distillation). EEVE gives a new token the mean of its
pieces' rows, but a mean of input rows is not what the model computed from the pieces in
context. Here, for each new token t, a few windows of training text where the merged tokenizer
writes t (held-out text never: the windows come from the text the BPE read):

  teacher  the base reads every new token of the window as its base pieces
  student  the same tokens, except this occurrence of t, which is t itself

and t's row is fitted by Adam, everything else frozen, to two ends at once:

  input role   the student's final hidden states at t and after it match the teacher's at t's
               last piece and after it (MSE: the paper's objective at its code's default layer,
               the last one, after the final norm)
  output role  SmolLM2 ties the row to the LM head, so it also says how likely t is. The
               position before t reads the same tokens in both passes, so its hidden state is
               the teacher's own; the cross-entropy of t there is added with the weight
               alpha = MSE / CE, a stop-gradient ratio (the code's "CE-auto-weighted", the
               paper's "+ alpha NTP"). An untied head's new rows are fitted by that term alone.

No window holds another new token as itself, so each row is fitted alone: a group of tokens
gives the same rows whichever rank computes it, in one process or several, and whether or not
the run was killed between groups. Rank r fits groups r, r + world, ...; each group is a file of
its own (distill/groups/), and rank 0 assembles distill/init once all are there
(prepare.stage_distill runs the stage).
"""
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from atomic import atomic_file, disk_errors, read_json
from checkpoint import export_folder, write_done
from hf_io import from_pretrained

GROUP_TOKENS = 16  # new tokens fitted together: one batch of their windows, one file
CHUNK_SEQUENCES = 32  # windows per forward pass (memory); gradients add up over a group's


@dataclass(frozen=True)
class Settings:
    """The stage's knobs (Config's distill_* fields)."""
    tokens: int  # the most frequent new tokens of the text (0: every one that occurs)
    contexts: int  # windows per token, at most one per document
    before: int  # base tokens of context before the occurrence
    after: int  # base tokens after it: where the MSE sees what the token changed
    steps: int  # Adam steps per group, each over all of the group's windows
    lr: float


def settings(cfg) -> Settings:
    """The stage's knobs from a bori.Config."""
    return Settings(tokens=cfg.distill_tokens, contexts=cfg.distill_contexts,
                    before=cfg.distill_before, after=cfg.distill_after, steps=cfg.distill_steps,
                    lr=cfg.distill_lr)


def windows(texts, tok: Tokenizer, eos_id: int, n_old: int, s: Settings) -> dict:
    """{new token id: [(merged ids, index of the occurrence)]}, the most frequent tokens first.
    A document is [EOS] + its tokens, as in training; the first occurrence in each document."""
    docs = [np.array([eos_id] + e.ids, dtype=np.int64) for e in tok.encode_batch(list(texts))]
    counts = np.bincount(np.concatenate(docs), minlength=tok.get_vocab_size())[n_old:]
    order = sorted((i for i in range(len(counts)) if counts[i]), key=lambda i: (-counts[i], i))
    chosen = [n_old + i for i in order[:s.tokens or None]]
    found = {t: [] for t in chosen}
    for ids in docs:
        new_ids, first = np.unique(ids[1:], return_index=True)
        for t, p in zip(new_ids.tolist(), (first + 1).tolist()):
            if t in found and len(found[t]) < s.contexts:
                lo = max(0, p - s.before)  # a merged token is one base token or more:
                # s.before merged tokens hold s.before base ones (pair() cuts them)
                found[t].append((ids[lo:p + s.after + 1].tolist(), p - lo))
    return found


def pair(window: list, at: int, pieces: list, n_old: int, s: Settings) -> tuple:
    """(teacher ids, student ids, index of t in the student): both in base pieces except the
    student's t, cut to s.before base tokens before t and s.after after it."""
    def expand(ids):
        return [q for i in ids for q in (pieces[i - n_old] if i >= n_old else [i])]
    head, tail, own = expand(window[:at])[-s.before:], expand(window[at + 1:])[:s.after], \
        pieces[window[at] - n_old]
    return head + own + tail, head + [window[at]] + tail, len(head)


def fit_group(model, tokens: list, found: dict, pieces: list, n_old: int, s: Settings, ctx):
    """(input rows, an untied head's rows or None, first loss, last loss) of tokens, fitted on
    their windows."""
    pairs = [(k, *pair(w, at, pieces, n_old, s)) for k, t in enumerate(tokens)
             for w, at in found[t]]
    dev, weight = model.embed_tokens.weight.device, model.embed_tokens.weight.detach()
    ids = torch.tensor(tokens, device=dev)
    rows = torch.nn.Parameter(weight[ids].float().clone())  # EEVE's rows to start from
    tied = model.lm_head.weight is model.embed_tokens.weight
    out_rows = rows if tied else torch.nn.Parameter(model.lm_head.weight.detach()[ids].float())
    opt = torch.optim.Adam([rows] if tied else [rows, out_rows], lr=s.lr)
    chunks = [pairs[i:i + CHUNK_SEQUENCES] for i in range(0, len(pairs), CHUNK_SEQUENCES)]
    prepared = [teacher_side(model, c, tokens, ctx) for c in chunks]
    n_positions = sum(int(p["mask"].sum()) for p in prepared)
    losses = []
    for _ in range(s.steps + 1):  # the last pass only measures
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for p in prepared:
            mse, ce = student_losses(model, p, rows, out_rows, ids, ctx)
            mse = mse / n_positions  # the mean over the group's positions and channels
            ce = ce / len(pairs)
            loss = combined(mse, ce)
            total += loss.item()
            if len(losses) < s.steps:
                loss.backward()
        losses.append(total)
        if len(losses) <= s.steps:
            opt.step()
    return rows.detach(), None if tied else out_rows.detach(), losses[0], losses[-1]


def combined(mse, ce):
    """MSE + alpha CE, alpha = MSE / CE taken as a constant: the CE term weighs as much as the
    MSE at every step (the code's "CE-auto-weighted")."""
    return mse + mse.detach() / ce.detach().clamp_min(1e-12) * ce


def padded(seqs: list, dev) -> torch.Tensor:
    """Right-padded (causal attention: padding after a sequence changes nothing in it)."""
    width = max(map(len, seqs))
    return torch.tensor([q + [0] * (width - len(q)) for q in seqs], device=dev)


@torch.no_grad()
def teacher_side(model, chunk: list, tokens: list, ctx) -> dict:
    """What the student is fitted to: the teacher's hidden states aligned with the student's
    positions from t on (student j <-> teacher j + len(pieces) - 1), and the hidden state
    before t, which both passes share."""
    dev = model.embed_tokens.weight.device
    owner = torch.tensor([k for k, *_ in chunk], device=dev)
    at = torch.tensor([a for *_, a in chunk], device=dev)
    student = padded([q for _, _, q, _ in chunk], dev)
    lengths = torch.tensor([len(q) for _, _, q, _ in chunk], device=dev)
    shift = torch.tensor([len(t) - len(q) for _, t, q, _ in chunk], device=dev)
    with ctx:
        teacher = model.hidden(padded([t for _, t, _, _ in chunk], dev)).float()
    j = torch.arange(student.shape[1], device=dev)[None]
    mask = (j >= at[:, None]) & (j < lengths[:, None])
    index = (j + shift[:, None]).clamp(max=teacher.shape[1] - 1)
    target = teacher.gather(1, index[..., None].expand(-1, -1, teacher.shape[2]))
    before = teacher[torch.arange(len(chunk), device=dev), at - 1]
    return dict(owner=owner, at=at, student=student, mask=mask, target=target, before=before,
                label=torch.tensor([tokens[k] for k, *_ in chunk], device=dev))


def student_losses(model, p: dict, rows, out_rows, ids, ctx) -> tuple:
    """(summed squared error over masked positions and channels / channels, summed CE)."""
    b = torch.arange(len(p["at"]), device=rows.device)
    x = model.embed_tokens(p["student"]).float()
    x = x.index_put((b, p["at"]), rows[p["owner"]])  # the row being fitted, with its gradient
    cos, sin = model.rope_cos[:x.shape[1]], model.rope_sin[:x.shape[1]]
    with ctx:
        for block in model.layers:
            x = block(x, cos, sin)
        h = model.norm(x).float()
    mse = ((h - p["target"]) ** 2)[p["mask"]].sum() / h.shape[-1]
    # t's probability over the whole vocabulary, with the fitted output rows in t's places
    weight = model.lm_head.weight.detach()[:model.cfg.vocab_size].float()
    logits = (p["before"] @ weight.T).index_copy(1, ids, p["before"] @ out_rows.T)
    return mse, F.cross_entropy(logits, p["label"], reduction="sum")


def fit_my_groups(run, s: Settings, init_dir: Path, groups_dir: Path, tokens: list, found):
    """This rank's groups: each fitted unless its file is there, and written whole."""
    cfg, env = run.cfg, run.env
    emap = read_json(run.out / "tokenizer" / "eeve_map.json", f"delete {run.out}/tokenizer")
    model = from_pretrained(init_dir).to(env.device).eval().requires_grad_(False)
    groups = [tokens[i:i + GROUP_TOKENS] for i in range(0, len(tokens), GROUP_TOKENS)]
    for g in range(env.rank, len(groups), env.world_size):
        path = groups_dir / f"group-{g:05d}.safetensors"
        if fitted_already(path, groups[g]):
            continue  # fitted before a kill: the same rows again, so not again
        run.check_stop("token distillation went on")
        torch.manual_seed(cfg.seed + g)  # nothing draws today; a later change stays per group
        rows, out_rows, first, last = fit_group(model, groups[g], found, emap["pieces"],
                                                emap["base_vocab_size"], s, run.ctx)
        part = {"tokens": torch.tensor(groups[g]), "rows": rows.cpu().contiguous(),
                "loss": torch.tensor([first, last], dtype=torch.float64)}
        if out_rows is not None:  # an untied head's rows
            part["out_rows"] = out_rows.cpu().contiguous()
        with disk_errors(path), atomic_file(path) as tmp:
            save_file(part, str(tmp))
        print(f"  rank {env.rank} group {g + 1}/{len(groups)}: loss {first:.4f} -> {last:.4f}",
              flush=True)


def fitted_already(path: Path, group: list) -> bool:
    """Whether path holds this group's rows; a damaged file (written whole, then harmed) is
    not, and the group is fitted again."""
    try:
        return path.is_file() and load_file(path)["tokens"].tolist() == group
    except (SafetensorError, KeyError):
        return False


def assemble(run, init_dir: Path, folder: Path, n_groups: int, started: float):
    """Rank 0: the init model with every fitted row in place -> folder/init, DONE.json."""
    model = from_pretrained(init_dir)
    firsts, lasts = [], []
    with torch.no_grad():
        for g in range(n_groups):
            part = load_file(folder / "groups" / f"group-{g:05d}.safetensors")
            ids = part["tokens"]
            model.embed_tokens.weight[ids] = part["rows"].to(model.embed_tokens.weight.dtype)
            if model.lm_head.weight is not model.embed_tokens.weight:
                model.lm_head.weight[ids] = part["out_rows"].to(model.lm_head.weight.dtype)
            firsts.append(float(part["loss"][0]))
            lasts.append(float(part["loss"][1]))
    export_folder(model, run.out / "tokenizer", folder / "init")
    record = {"groups": n_groups, "loss_first": sum(firsts) / max(1, n_groups),
              "loss_last": sum(lasts) / max(1, n_groups), "seconds": time.time() - started}
    write_done(folder, record)
    print(f"token distillation: {n_groups} groups, mean loss {record['loss_first']:.4f} -> "
          f"{record['loss_last']:.4f}, {record['seconds']:.0f} s", flush=True)

