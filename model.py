"""A Llama / SmolLM2 decoder from scratch, with KV-cache generation and vocabulary expansion.

    model = hf_io.from_pretrained("path/to/hf_folder")  # config.json + model.safetensors
    logits = model(idx)                                  # (B, T, vocab) float
    loss = model(idx, targets)                           # mean next-token cross-entropy

Parameter names are Hugging Face's `LlamaForCausalLM` keys (minus the `model.` prefix), so
SmolLM2 checkpoints load without renaming (hf_io.py). Llama: Touvron et al. 2023,
arXiv:2302.13971.
"""
import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from loss import IGNORE_INDEX, cross_entropy_sum


@dataclass
class ModelConfig:
    """A Llama decoder's shapes; the defaults are SmolLM2-135M's."""
    dim: int = 576
    n_layers: int = 30
    n_heads: int = 9
    n_kv_heads: int = 3  # grouped-query attention: 3 query heads share each key/value head
    ffn_dim: int = 1536
    vocab_size: int = 49152
    max_seq_len: int = 8192
    rope_theta: float = 100000.0  # SmolLM2's RoPE base, 10x Llama 2's 10,000
    norm_eps: float = 1e-5
    tie_embeddings: bool = True  # SmolLM2's LM head is its embedding: 28.3M of its 135M weights
    pad_vocab_to: int = 1  # embedding rows padded to a multiple of this (64 suits tensor cores)

    def __post_init__(self):
        if self.dim % self.n_heads or self.n_heads % self.n_kv_heads:
            raise ValueError(f"dim={self.dim} must divide into n_heads={self.n_heads}, "
                             f"and n_heads into n_kv_heads={self.n_kv_heads}")
        self.head_dim = self.dim // self.n_heads
        self.padded_vocab_size = math.ceil(self.vocab_size / self.pad_vocab_to) * self.pad_vocab_to



# Looked up by exact name. The SmolLM2 shapes are those of HuggingFaceTB's config.json files.
MODEL_PRESETS = {
    "smollm2-135m": ModelConfig(),
    "smollm2-360m": ModelConfig(dim=960, n_layers=32, n_heads=15, n_kv_heads=5, ffn_dim=2560),
    "tiny": ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128,
                        vocab_size=512, max_seq_len=256),
}


def preset(name: str, **overrides) -> ModelConfig:
    """A copy of the preset `name` with fields overridden."""
    if name not in MODEL_PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(MODEL_PRESETS)}")
    return dataclasses.replace(MODEL_PRESETS[name], **overrides)

# ----------------------------------------------------------------------------------------------
# The blocks


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32 (Zhang & Sennrich 2019, arXiv:1910.07467)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # fp32: the square of an activation above 256 passes fp16's 65,504
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)


def rope_tables(cfg: ModelConfig, device=None):
    """cos and sin of shape (max_seq_len, head_dim) for rotate-half RoPE (arXiv:2104.09864)."""
    # theta_i = rope_theta^(-2i / hd), i = 0 .. hd/2 - 1: one frequency per pair of dims
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, device=device).float()
                                        / cfg.head_dim)
    angles = torch.outer(torch.arange(cfg.max_seq_len, device=device).float(), inv_freq)
    angles = torch.cat((angles, angles), dim=-1)  # (T, hd): frequency i drives dims i and i+hd/2
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate pairs (x_i, x_{i+hd/2}) by position-dependent angles; x is (B, H, T, hd)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)  # transformers' rotate_half, so HF's weights fit
    return (x * cos + rotated * sin).to(x.dtype)  # cos, sin are fp32: keep q, k in x's dtype


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
        v = self.v_proj(x).view(B, T, KV, hd).transpose(1, 2)  # (B, KV, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, start, k, v)  # (B, KV, start+T, hd)
        # Repeat K/V ourselves: SDPA's enable_gqa falls back to the slow math kernel on a T4.
        k, v = k.repeat_interleave(H // KV, dim=1), v.repeat_interleave(H // KV, dim=1)
        if start == 0:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # no mask: flash can run
        else:  # T new queries after `start` cached positions: query i sees keys 0..start+i
            mask = torch.ones(T, start + T, dtype=torch.bool, device=x.device).tril(start)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return residual_linear(self.o_proj, y.transpose(1, 2).reshape(B, T, C))  # (B, T, C)


def residual_linear(linear: nn.Linear, x):
    """linear(x) for a branch added to the residual stream, returned in fp32 under fp16 autocast.

    There its fp16 output could pass fp16's largest number (SmolLM2's layer-11 MLP output
    reaches ~30,000 of 65,504, and GradScaler cannot repair a forward overflow). So the input
    is first scaled by a power of two (exact) that keeps the output's bound,
    max|x| * max_i sum_j |W_ij|, under 2^15, and the output is scaled back in fp32."""
    device = x.device.type
    # fp32 and bf16 (fp32's exponent range) cannot overflow: no scaling needed
    if not torch.is_autocast_enabled(device) or torch.get_autocast_dtype(device) != torch.float16:
        return linear(x)
    bound = x.detach().abs().amax().float() * linear.weight.detach().abs().sum(1).amax().float()
    # clamp_min: an all-zero input; clamp(max=1): only scaled down, small outputs keep their bits
    scale = torch.exp2(torch.floor(torch.log2(2.0**15 / bound.clamp_min(1e-30)))).clamp(max=1.0)
    return linear(x * scale.to(x.dtype)).float() / scale


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)) (Shazeer 2020, arXiv:2002.05202)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x):
        gate, up = self.gate_proj(x), self.up_proj(x)
        # the product in fp32: under fp16 it could overflow before down_proj scales it
        return residual_linear(self.down_proj, F.silu(gate.float()) * up.float())


class Block(nn.Module):
    """A pre-norm decoder layer: x + attention(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, cache=None, start=0):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache=cache, start=start)
        return x + self.mlp(self.post_attention_layernorm(x))


# ----------------------------------------------------------------------------------------------
# The model


class Llama(nn.Module):
    """Embedding, n_layers Blocks, a final RMSNorm and the LM head (the embedding, when tied)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.grad_checkpointing = False
        self.embed_tokens = nn.Embedding(cfg.padded_vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.padded_vocab_size, bias=False)
        if cfg.tie_embeddings:  # one Parameter: training the "embedding" trains the output rows
            self.lm_head.weight = self.embed_tokens.weight
        cos, sin = rope_tables(cfg)
        # not persistent: computed from the config, so they are in no state dict or file
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def hidden(self, idx, cache=None, start=0):
        """Final-norm hidden states (B, T, C) for token ids idx (B, T)."""
        T = idx.shape[1]
        if start + T > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {start + T} tokens exceeds max_seq_len="
                             f"{self.cfg.max_seq_len}; use shorter sequences")
        cos, sin = self.rope_cos[start:start + T], self.rope_sin[start:start + T]  # (T, hd)
        x = self.embed_tokens(idx)
        for block in self.layers:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                # Non-reentrant: the reentrant variant breaks under DDP ("marked ready twice").
                x = checkpoint(block, x, cos, sin, use_reentrant=False)
            else:
                x = block(x, cos, sin, cache=cache, start=start)
        return self.norm(x)

    def forward(self, idx, targets=None, reduction: str = "mean", cache=None, start: int = 0):
        """Float logits (B, T, vocab) without targets; with them the loss (mean or sum)."""
        h = self.hidden(idx, cache, start)
        if targets is None:
            return self.lm_head(h)[..., :self.cfg.vocab_size].float()  # no padding row predicts
        # in chunks of rows (loss.py): no (B*T, vocab) logits tensor ever exists
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
        logits = self(idx, cache=cache)[:, -1]  # the prompt in one pass fills the cache
        eos = torch.tensor(list(eos_ids) or [-1], device=idx.device)
        done = torch.zeros(B, dtype=torch.bool, device=idx.device)
        out = [idx]
        for pos in range(T, max_len):
            nxt = sample(logits, temperature, top_k=top_k, top_p=top_p, generator=generator)
            nxt = torch.where(done, eos[0], nxt)
            out.append(nxt[:, None])
            done |= torch.isin(nxt, eos)
            if done.all() or pos + 1 == max_len:
                break
            logits = self(nxt[:, None], cache=cache, start=pos)[:, -1]
        return torch.cat(out, dim=1)

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
    """Append len(pieces) rows to the embedding and LM head; pieces[i] lists base ids of new
    token i.

    eeve (Kim et al. 2024, arXiv:2402.14714): an input row is the mean of its pieces' rows, an
    output row is the first piece's output row. With tied embeddings (SmolLM2) one row serves
    both, and it is the mean. mean: the mean of all base rows; random: normal with the base
    rows' standard deviation."""
    cfg, n_new = model.cfg, len(pieces)
    if init == "eeve" and any(not p or max(p) >= cfg.vocab_size or min(p) < 0 for p in pieces):
        raise ValueError(f"an EEVE piece list is empty or names an id outside the base "
                         f"vocabulary of {cfg.vocab_size}; was the tokenizer merged into "
                         "another base?")
    if init not in ("eeve", "mean", "random"):
        raise ValueError(f"unknown init {init!r}; choose eeve, mean or random")
    gen = torch.Generator().manual_seed(seed)
    new = dataclasses.replace(cfg, vocab_size=cfg.vocab_size + n_new)
    # tied: one matrix serves both, so only the embedding grows (and it gets the mean)
    for name in ("embed_tokens", "lm_head") if not cfg.tie_embeddings else ("embed_tokens",):
        old = getattr(model, name).weight.detach()[:cfg.vocab_size]
        if init == "eeve" and name == "lm_head":
            rows = old[[p[0] for p in pieces]].float()  # EEVE: the first piece's output row
        elif init == "eeve":
            ids = torch.tensor([i for p in pieces for i in p], device=old.device)
            owner = torch.repeat_interleave(torch.arange(n_new, device=old.device),
                                            torch.tensor([len(p) for p in pieces],
                                                         device=old.device))
            sums = torch.zeros(n_new, cfg.dim, device=old.device).index_add_(
                0, owner, old[ids].float())
            rows = sums / torch.bincount(owner, minlength=n_new)[:, None]  # (n_new, dim) means
        elif init == "mean":
            rows = old.float().mean(0).expand(n_new, -1)
        else:
            rows = (torch.randn(n_new, cfg.dim, generator=gen) * old.float().std()).to(old.device)
        # padding rows stay zero; the base rows are copied bit for bit, so base logits are unchanged
        weight = torch.zeros(new.padded_vocab_size, cfg.dim, dtype=old.dtype, device=old.device)
        weight[:cfg.vocab_size], weight[cfg.vocab_size:new.vocab_size] = old, rows
        # a new Parameter: build the optimizer and the DDP wrapper after this (DDP fixes its
        # hooks at wrap time, and an optimizer built before would update the old tensor)
        getattr(model, name).weight = nn.Parameter(weight)
    model.cfg = new
    if new.tie_embeddings:  # re-tie: the embedding's new Parameter broke the tie
        model.lm_head.weight = model.embed_tokens.weight
    model.embed_tokens.num_embeddings = model.lm_head.out_features = new.padded_vocab_size
    return model


def drop_padding_rows(model: Llama, n: int) -> Llama:
    """Keep the first n rows of the embedding (and of an untied head): a base padded past its
    tokenizer's n tokens has rows no token reaches, and the merged tokenizer numbers its new
    tokens from n on, so expand_vocab must append its rows there."""
    cfg = model.cfg
    if n >= cfg.vocab_size:
        return model
    new = dataclasses.replace(cfg, vocab_size=n)
    for name in ("embed_tokens", "lm_head") if not cfg.tie_embeddings else ("embed_tokens",):
        old = getattr(model, name).weight.detach()
        weight = torch.zeros(new.padded_vocab_size, cfg.dim, dtype=old.dtype, device=old.device)
        weight[:n] = old[:n]
        getattr(model, name).weight = nn.Parameter(weight)
    model.cfg = new
    if new.tie_embeddings:  # a new Parameter: the tie is made again, as in expand_vocab
        model.lm_head.weight = model.embed_tokens.weight
    model.embed_tokens.num_embeddings = model.lm_head.out_features = new.padded_vocab_size
    return model


def flops_per_token(cfg: ModelConfig, n_params: int, seq_len: int) -> float:
    """Training FLOPs per token, 6N + 12·L·H·Q·T (PaLM, Chowdhery et al. 2022, appendix B)."""
    return 6 * n_params + 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len
