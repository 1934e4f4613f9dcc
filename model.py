"""A Llama / SmolLM2 decoder from scratch, loading and saving the Hugging Face layout.

    model = Llama.from_pretrained("path/to/hf_folder")   # config.json + model.safetensors
    logits = model(idx)                                  # (B, T, vocab) float
    loss = model(idx, targets)                           # mean next-token cross-entropy

Parameter names are Hugging Face's `LlamaForCausalLM` keys (minus the `model.` prefix), so
SmolLM2 checkpoints load without renaming. Llama: Touvron et al. 2023, arXiv:2302.13971.
"""
import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100  # targets with this id add nothing to the loss (PyTorch's convention)


@dataclass
class ModelConfig:
    dim: int = 576
    n_layers: int = 30
    n_heads: int = 9
    n_kv_heads: int = 3
    ffn_dim: int = 1536
    vocab_size: int = 49152
    max_seq_len: int = 8192
    rope_theta: float = 100000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    pad_vocab_to: int = 1  # embedding rows padded to a multiple of this (64 suits tensor cores)

    def __post_init__(self):
        if self.dim % self.n_heads or self.n_heads % self.n_kv_heads:
            raise ValueError(f"dim={self.dim} must divide into n_heads={self.n_heads}, "
                             f"and n_heads into n_kv_heads={self.n_kv_heads}")
        self.head_dim = self.dim // self.n_heads
        self.padded_vocab_size = math.ceil(self.vocab_size / self.pad_vocab_to) * self.pad_vocab_to

    @classmethod
    def from_hf_config(cls, hf: dict) -> "ModelConfig":
        """Read a Hugging Face Llama `config.json` dict (transformers 4.x or 5.x)."""
        rope = hf.get("rope_parameters") or {}
        if (hf.get("rope_scaling") or {}).get("rope_type", "default") != "default":
            raise ValueError(f"rope_scaling={hf['rope_scaling']} is not supported; "
                             "bori implements plain RoPE only")
        return cls(dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
                   n_heads=hf["num_attention_heads"],
                   n_kv_heads=hf.get("num_key_value_heads", hf["num_attention_heads"]),
                   ffn_dim=hf["intermediate_size"], vocab_size=hf["vocab_size"],
                   max_seq_len=hf.get("max_position_embeddings", 2048),
                   rope_theta=hf.get("rope_theta", rope.get("rope_theta", 10000.0)),
                   norm_eps=hf.get("rms_norm_eps", 1e-6),
                   tie_embeddings=hf.get("tie_word_embeddings", False))

    def to_hf_config(self, **extra) -> dict:
        """The `config.json` dict that transformers' LlamaForCausalLM reads."""
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                "hidden_size": self.dim, "num_hidden_layers": self.n_layers,
                "num_attention_heads": self.n_heads, "num_key_value_heads": self.n_kv_heads,
                "head_dim": self.head_dim, "intermediate_size": self.ffn_dim,
                "vocab_size": self.vocab_size, "max_position_embeddings": self.max_seq_len,
                "rope_theta": self.rope_theta,
                "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
                "rms_norm_eps": self.norm_eps, "tie_word_embeddings": self.tie_embeddings,
                "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
                "torch_dtype": "float32", **extra}


# Looked up by exact name. The SmolLM2 shapes are those of HuggingFaceTB's config.json files.
PRESETS = {
    "smollm2-135m": ModelConfig(),
    "smollm2-360m": ModelConfig(dim=960, n_layers=32, n_heads=15, n_kv_heads=5, ffn_dim=2560),
    "tiny": ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128,
                        vocab_size=512, max_seq_len=256),
}


def preset(name: str, **overrides) -> ModelConfig:
    """A copy of the preset `name` with fields overridden."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    base = {f.name: getattr(PRESETS[name], f.name) for f in fields(ModelConfig)}
    return ModelConfig(**{**base, **overrides})

# ----------------------------------------------------------------------------------------------
# The blocks


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32 (Zhang & Sennrich 2019, arXiv:1910.07467)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)


def rope_tables(cfg: ModelConfig, device=None):
    """cos and sin of shape (max_seq_len, head_dim) for rotate-half RoPE (arXiv:2104.09864)."""
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, device=device).float()
                                        / cfg.head_dim)
    angles = torch.outer(torch.arange(cfg.max_seq_len, device=device).float(), inv_freq)
    angles = torch.cat((angles, angles), dim=-1)  # (T, hd): frequency i drives dims i and i+hd/2
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate pairs (x_i, x_{i+hd/2}) by position-dependent angles; x is (B, H, T, hd)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class KVCache:
    """Keys and values of past positions, one (B, n_kv_heads, max_len, hd) pair per layer."""

    def __init__(self, n_layers: int, max_len: int):
        self.max_len = max_len
        self.k, self.v = [None] * n_layers, [None] * n_layers

    def update(self, layer: int, start: int, k, v):
        """Store k, v at positions start.. and return all keys and values up to them."""
        if self.k[layer] is None:  # allocated on first use, in the dtype autocast gives k and v
            B, KV, _, hd = k.shape
            self.k[layer] = k.new_zeros(B, KV, self.max_len, hd)
            self.v[layer] = v.new_zeros(B, KV, self.max_len, hd)
        end = start + k.shape[2]
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class Attention(nn.Module):
    """Grouped-query attention (Ainslie et al. 2023, arXiv:2305.13245) through SDPA."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        hd = cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * hd, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * hd, cfg.dim, bias=False)

    def forward(self, x, cos, sin, cache=None, start=0):
        B, T, C = x.shape
        H, KV, hd = self.cfg.n_heads, self.cfg.n_kv_heads, self.cfg.head_dim
        q = self.q_proj(x).view(B, T, H, hd).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_proj(x).view(B, T, KV, hd).transpose(1, 2)  # (B, KV, T, hd)
        v = self.v_proj(x).view(B, T, KV, hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, start, k, v)  # (B, KV, start+T, hd)
        # Repeat K/V ourselves: SDPA's enable_gqa falls back to the slow math kernel on a T4.
        k, v = k.repeat_interleave(H // KV, dim=1), v.repeat_interleave(H // KV, dim=1)
        if start == 0:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # T new queries after `start` cached positions: query i sees keys 0..start+i
            mask = torch.ones(T, start + T, dtype=torch.bool, device=x.device).tril(start)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)) (Shazeer 2020, arXiv:2002.05202)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, cache=None, start=0):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, start)
        return x + self.mlp(self.post_attention_layernorm(x))

# ----------------------------------------------------------------------------------------------
# The loss


class LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of logits = h @ W[:V].T, a chunk of rows at a time.

    The full (N, V) logits never exist: each chunk's gradient of the sum, softmax - onehot, is
    turned into dh and dW in the forward pass, and backward only scales them. The same idea as
    Liger Kernel's fused linear cross-entropy (arXiv:2410.10989)."""

    @staticmethod
    def forward(ctx, h, weight, targets, vocab_size: int, rows: int, with_grad: bool):
        loss = torch.zeros((), device=h.device)
        dh = torch.empty_like(h, dtype=torch.float32) if with_grad else None
        dw = torch.zeros_like(weight, dtype=torch.float32) if with_grad else None
        w, fp16 = weight[:vocab_size], torch.is_autocast_enabled(h.device.type)
        for s in range(0, h.shape[0], rows):
            hc, tc = h[s:s + rows], targets[s:s + rows]
            ignored = tc == IGNORE_INDEX
            tc = tc.masked_fill(ignored, 0)
            logp = torch.log_softmax((hc @ w.T).float(), dim=-1)  # (rows, V); fp16 matmul
            nll = -logp.gather(1, tc[:, None]).squeeze(1)          # under autocast
            loss += nll.masked_fill(ignored, 0.0).sum()
            if not with_grad:
                continue
            g = logp.exp_()  # d(sum of nll)/d(logits) = softmax - onehot, in place
            g[torch.arange(len(tc), device=g.device), tc] -= 1.0
            g[ignored] = 0.0
            if fp16:  # scale g by a power of two (exact) so that g @ W and g.T @ h stay
                # below fp16's max, 65504, as GradScaler does for the rest of the model
                bound = torch.maximum(g.abs().sum(0).max() * hc.abs().max(),
                                      g.abs().sum(1).max() * w.abs().max())
                scale = torch.exp2(torch.floor(torch.log2(2.0**15 / bound.clamp_min(1e-30))))
                g *= scale
                dh[s:s + rows] = (g @ w).float() / scale
                dw[:vocab_size] += (g.T @ hc).float() / scale
            else:
                torch.mm(g, w, out=dh[s:s + rows])
                dw[:vocab_size].addmm_(g.T, hc)
        if with_grad:
            ctx.save_for_backward(dh, dw)
            ctx.dtypes = h.dtype, weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        dh, dw = ctx.saved_tensors
        return (dh * grad_loss).to(ctx.dtypes[0]), (dw * grad_loss).to(ctx.dtypes[1]), \
            None, None, None, None


def loss_chunk_rows(vocab_size: int) -> int:
    """Rows per chunk of the loss: 128 MiB of fp32 logits."""
    return max(1, 2**25 // vocab_size)


def cross_entropy_sum(h, weight, targets, vocab_size: int, chunk_rows: int = 0):
    """Summed cross-entropy in nats of (N, C) hidden states against (N,) target ids."""
    rows = chunk_rows or loss_chunk_rows(vocab_size)
    with_grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    return LinearCrossEntropy.apply(h, weight, targets, vocab_size, rows, with_grad)

# ----------------------------------------------------------------------------------------------
# The model


class Llama(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.grad_checkpointing = False
        self.embed_tokens = nn.Embedding(cfg.padded_vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.padded_vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        cos, sin = rope_tables(cfg)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def hidden(self, idx, cache=None, start=0):
        """Final-norm hidden states (B, T, C) for token ids idx (B, T)."""
        T = idx.shape[1]
        if start + T > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {start + T} tokens exceeds max_seq_len="
                             f"{self.cfg.max_seq_len}; use shorter sequences")
        cos, sin = self.rope_cos[start:start + T], self.rope_sin[start:start + T]
        x = self.embed_tokens(idx)
        for block in self.layers:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                # Non-reentrant: the reentrant variant breaks under DDP ("marked ready twice").
                x = checkpoint(block, x, cos, sin, use_reentrant=False)
            else:
                x = block(x, cos, sin, cache, start)
        return self.norm(x)

    def forward(self, idx, targets=None, reduction: str = "mean", cache=None, start: int = 0):
        """Float logits (B, T, vocab) without targets; with them the loss (mean or sum)."""
        h = self.hidden(idx, cache, start)
        if targets is None:
            return self.lm_head(h)[..., :self.cfg.vocab_size].float()
        loss = cross_entropy_sum(h.flatten(0, 1), self.lm_head.weight, targets.flatten(),
                                 self.cfg.vocab_size)
        if reduction == "sum":
            return loss
        # A tensor divisor, not int(...): no device sync and no torch.compile graph break.
        return loss / (targets != IGNORE_INDEX).sum().clamp_min(1)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, eos_ids=(), generator=None):
        """Continue idx (B, T) by up to max_new_tokens; temperature 0 is greedy.

        One KV cache holds past keys and values, so each new token costs one position's work.
        A row stops at its first id in eos_ids; finished rows are padded with that id."""
        B, T = idx.shape
        max_len = min(T + max_new_tokens, self.cfg.max_seq_len)
        cache = KVCache(self.cfg.n_layers, max_len)
        logits = self(idx, cache=cache)[:, -1]
        eos = torch.tensor(list(eos_ids) or [-1], device=idx.device)
        done = torch.zeros(B, dtype=torch.bool, device=idx.device)
        out = [idx]
        for pos in range(T, max_len):
            nxt = sample(logits, temperature, top_k, top_p, generator)
            nxt = torch.where(done, eos[0], nxt)
            out.append(nxt[:, None])
            done |= torch.isin(nxt, eos)
            if done.all() or pos + 1 == max_len:
                break
            logits = self(nxt[:, None], cache=cache, start=pos)[:, -1]
        return torch.cat(out, dim=1)

    # ------------------------------------------------------------------------------------------
    # Hugging Face layout: config.json + model.safetensors

    @classmethod
    def from_pretrained(cls, path, pad_vocab_to: int = 1) -> "Llama":
        """Load a Hugging Face Llama folder strictly: every tensor present, every shape right."""
        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} has no config.json: expected a Hugging Face model "
                                    "folder; make one with `python convert_gguf.py`")
        hf = json.loads((path / "config.json").read_text())
        cfg = ModelConfig.from_hf_config(hf)
        cfg = ModelConfig(**{**asdict(cfg), "pad_vocab_to": pad_vocab_to})
        model = cls(cfg)
        model.load_hf_state(read_safetensors(path), source=str(path))
        model.hf_extra = {k: hf[k] for k in ("bos_token_id", "eos_token_id") if k in hf}
        return model

    def hf_state_shapes(self) -> dict:
        """Hugging Face tensor name -> (our parameter, the shape stored on disk)."""
        out = {}
        for name, p in self.named_parameters():  # a tied lm_head is listed once, as the embedding
            shape = tuple(p.shape)
            if name in ("embed_tokens.weight", "lm_head.weight"):
                shape = (self.cfg.vocab_size, self.cfg.dim)  # padding rows are not stored
            out[name if name.startswith("lm_head") else "model." + name] = (p, shape)
        return out

    def load_hf_state(self, state: dict, source: str = "state dict"):
        """Copy Hugging Face-named tensors into the model, refusing any mismatch."""
        expected = self.hf_state_shapes()
        optional = {"lm_head.weight"} if self.cfg.tie_embeddings else set()
        missing = [k for k in expected if k not in state]
        unexpected = [k for k in state if k not in expected and k not in optional
                      and not k.endswith("rotary_emb.inv_freq")]
        if missing or unexpected:
            what = (f"lacks tensor {missing[0]!r}" if missing
                    else f"has unexpected tensor {unexpected[0]!r}")
            more = len(missing) + len(unexpected) - 1
            raise ValueError(f"{source} {what}{f' (and {more} more mismatches)' if more else ''}: "
                             "it is incomplete or was made for another model shape")
        with torch.no_grad():
            for key, (param, shape) in expected.items():
                tensor = state[key]
                if tuple(tensor.shape) != shape:
                    raise ValueError(f"{source}: tensor {key!r} has shape {tuple(tensor.shape)}, "
                                     f"config.json implies {shape}; the weights and config differ")
                param[:shape[0]].copy_(tensor)

    def save_pretrained(self, path, **extra_config):
        """Write config.json and model.safetensors (fp32, tied weights stored once)."""
        from safetensors.torch import save_file
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = {k: p.detach()[:shape[0]].float().cpu().contiguous()
                 for k, (p, shape) in self.hf_state_shapes().items()}
        from safetensors import SafetensorError
        try:
            save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
        except SafetensorError as e:  # safetensors reports I/O failures (disk full) as its own
            raise OSError(str(e).removeprefix("Error while serializing: ")) from None
        hf = self.cfg.to_hf_config(**{**getattr(self, "hf_extra", {}), **extra_config})
        (path / "config.json").write_text(json.dumps(hf, indent=2) + "\n")


def read_safetensors(path: Path) -> dict:
    """All tensors of model.safetensors, or of the shards listed in its index file."""
    from safetensors.torch import load_file
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").is_file():
        shards = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{path} has no model.safetensors (nor an index of shards); "
                                "bori reads safetensors weights only")
    state = {}
    for shard in shards:
        if not (path / shard).is_file():
            raise FileNotFoundError(f"shard {path / shard} named in the index is missing")
        state.update(load_file(str(path / shard)))
    return state


def sample(logits, temperature: float, top_k: int = 0, top_p: float = 1.0, generator=None):
    """One token id per row of logits (B, V): greedy, or top-k / nucleus sampling."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:  # nucleus sampling: Holtzman et al. 2019, arXiv:1904.09751
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs > top_p  # keep the smallest prefix with mass > top_p
        logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(1)

# ----------------------------------------------------------------------------------------------
# Vocabulary expansion


def expand_vocab(model: Llama, pieces: list, init: str = "eeve", seed: int = 0):
    """Append len(pieces) rows to the (tied) embedding; pieces[i] lists base ids of new token i.

    eeve: each new row is the mean of its pieces' rows (Kim et al. 2024, arXiv:2402.14714);
    mean: the mean of all base rows; random: normal with the base rows' standard deviation."""
    cfg, old = model.cfg, model.embed_tokens.weight.detach()[:model.cfg.vocab_size]
    n_new = len(pieces)
    if init == "eeve":
        if any(not p or max(p) >= cfg.vocab_size or min(p) < 0 for p in pieces):
            raise ValueError(f"an EEVE piece list is empty or names an id outside the base "
                             f"vocabulary of {cfg.vocab_size}; was the tokenizer merged into "
                             "another base?")
        ids = torch.tensor([i for p in pieces for i in p], device=old.device)
        owner = torch.repeat_interleave(torch.arange(n_new, device=old.device),
                                        torch.tensor([len(p) for p in pieces], device=old.device))
        sums = torch.zeros(n_new, cfg.dim, device=old.device).index_add_(0, owner, old[ids].float())
        rows = sums / torch.bincount(owner, minlength=n_new)[:, None]
    elif init == "mean":
        rows = old.float().mean(0).expand(n_new, -1)
    elif init == "random":
        gen = torch.Generator().manual_seed(seed)
        rows = (torch.randn(n_new, cfg.dim, generator=gen) * old.float().std()).to(old.device)
    else:
        raise ValueError(f"unknown init {init!r}; choose eeve, mean or random")
    model.cfg = new = ModelConfig(**{**asdict(cfg), "vocab_size": cfg.vocab_size + n_new})
    old_head = None if cfg.tie_embeddings else model.lm_head.weight.detach()[:cfg.vocab_size]
    for name, base in (("embed_tokens", old), ("lm_head", old_head)):
        if base is None:
            continue
        weight = torch.zeros(new.padded_vocab_size, cfg.dim, dtype=old.dtype, device=old.device)
        weight[:cfg.vocab_size], weight[cfg.vocab_size:new.vocab_size] = base, rows
        getattr(model, name).weight = nn.Parameter(weight)
    if new.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.embed_tokens.num_embeddings = model.lm_head.out_features = new.padded_vocab_size
    return model


def flops_per_token(cfg: ModelConfig, n_params: int, seq_len: int) -> float:
    """Training FLOPs per token, 6N + 12·L·H·Q·T (PaLM, Chowdhery et al. 2022, appendix B)."""
    return 6 * n_params + 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len
