"""Models in Hugging Face's layout: config.json and model.safetensors, loaded strictly.

    model = from_pretrained("path/to/folder")   # a model.Llama; every tensor present and right
    save_pretrained(model, "path/to/folder")     # fp32, tied embedding stored once

Tensor names are `LlamaForCausalLM`'s, so SmolLM2 folders load as they are and ours load in
transformers. Hugging Face's config names appear here and nowhere else.
"""
import dataclasses
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from model import Llama, ModelConfig


def config_from_hf(hf: dict) -> ModelConfig:
    """Read a Hugging Face Llama `config.json` dict (transformers 4.x or 5.x)."""
    rope = hf.get("rope_parameters") or {}  # transformers 5 keeps rope_theta in here
    # a scaled RoPE (Llama 3's, YaRN) needs other tables than rope_tables: refuse, not misread
    if (hf.get("rope_scaling") or {}).get("rope_type", "default") != "default":
        raise ValueError(f"rope_scaling={hf['rope_scaling']} is not supported; "
                         "bori implements plain RoPE only")
    # a key a config leaves out takes transformers' LlamaConfig default, as transformers would
    return ModelConfig(dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
                       n_heads=hf["num_attention_heads"],
                       n_kv_heads=hf.get("num_key_value_heads", hf["num_attention_heads"]),
                       ffn_dim=hf["intermediate_size"], vocab_size=hf["vocab_size"],
                       max_seq_len=hf.get("max_position_embeddings", 2048),
                       rope_theta=hf.get("rope_theta", rope.get("rope_theta", 10000.0)),
                       norm_eps=hf.get("rms_norm_eps", 1e-6),
                       tie_embeddings=hf.get("tie_word_embeddings", False))


def config_to_hf(cfg: ModelConfig, **extra) -> dict:
    """The `config.json` dict that transformers' LlamaForCausalLM reads."""
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "hidden_size": cfg.dim, "num_hidden_layers": cfg.n_layers,
            "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
            "head_dim": cfg.head_dim, "intermediate_size": cfg.ffn_dim,
            "vocab_size": cfg.vocab_size, "max_position_embeddings": cfg.max_seq_len,
            "rope_theta": cfg.rope_theta,  # both spellings: transformers 4 reads this one,
            "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},  # 5 this
            "rms_norm_eps": cfg.norm_eps, "tie_word_embeddings": cfg.tie_embeddings,
            "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
            "torch_dtype": "float32", **extra}  # save_pretrained stores fp32


def hf_state_shapes(model: Llama) -> dict:
    """Hugging Face tensor name -> (our parameter, the shape stored on disk)."""
    out = {}
    for name, p in model.named_parameters():  # a tied lm_head is listed once, as the embedding
        shape = tuple(p.shape)
        if name in ("embed_tokens.weight", "lm_head.weight"):
            shape = (model.cfg.vocab_size, model.cfg.dim)  # padding rows are not stored
        # HF nests the decoder under "model."; its lm_head sits beside it
        out[name if name.startswith("lm_head") else "model." + name] = (p, shape)
    return out


def load_hf_state(model: Llama, state: dict, source: str = "state dict"):
    """Copy Hugging Face-named tensors into the model, refusing any mismatch."""
    expected = hf_state_shapes(model)
    optional = {"lm_head.weight"} if model.cfg.tie_embeddings else set()  # a tied copy: ignored
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected and k not in optional
                  and not k.endswith("rotary_emb.inv_freq")]  # RoPE's buffer; we compute it
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
            param[:shape[0]].copy_(tensor)  # into the Parameter itself: a tied head stays tied
            param[shape[0]:].zero_()  # padding rows: no random row that anything could emit


def read_safetensors(path: Path) -> dict:
    """All tensors of model.safetensors, or of the shards listed in its index file."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        # weight_map: tensor name -> shard file; each shard is read once
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
        try:
            state.update(load_file(str(path / shard)))
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{path / shard} is damaged or cut short ({e}); copy or export "
                             "it again") from None
    return state


def model_folder(path) -> Path:
    """A model folder: path itself, or in a bori run folder its final model, else its newest
    finished phase's model, else that phase's newest checkpoint."""
    path = Path(path)
    if (path / "config.json").is_file() and (path / "tokenizer.json").is_file() or (
            path / "model.safetensors").is_file():
        return path
    # phase folders sort in the order they run, so the newest comes first reversed
    for candidate in [path / "final", *sorted(path.glob("phase*/model"), reverse=True),
                      *sorted(path.glob("phase*/ckpt-??????"), reverse=True)]:
        if (candidate / "model.safetensors").is_file():
            return candidate
    raise FileNotFoundError(f"{path} holds no model: pass a model folder (one with config.json "
                            "and model.safetensors) or a bori run folder")


def tokenizer_folder(folder: Path) -> Path:
    """The folder holding a model's tokenizer.json: its own, or for a checkpoint (which holds
    weights only: RUN/phase*/ckpt-N) its run's merged tokenizer, two levels up."""
    for candidate in (folder, folder.parent.parent / "tokenizer"):
        if (candidate / "tokenizer.json").is_file():
            return candidate
    raise FileNotFoundError(f"no tokenizer.json in {folder} or its run's tokenizer/ folder; "
                            "pass a model folder that bori exported")


def from_pretrained(path, pad_vocab_to: int = 1) -> Llama:
    """Load a Hugging Face Llama folder strictly: every tensor present, every shape right."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json: expected a Hugging Face model "
                                "folder; make one with `python convert_gguf.py`")
    hf = json.loads((path / "config.json").read_text())
    model = Llama(dataclasses.replace(config_from_hf(hf), pad_vocab_to=pad_vocab_to))
    load_hf_state(model, read_safetensors(path), source=str(path))
    # kept for save_pretrained: an exported folder carries the base's bos and eos ids on
    model.hf_extra = {k: hf[k] for k in ("bos_token_id", "eos_token_id") if k in hf}
    return model


def save_pretrained(model: Llama, path, **extra_config):
    """Write model.safetensors (fp32, tied weights stored once), config.json and
    generation_config.json."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    # padding rows cut off; contiguous, as safetensors stores no views; a tied head is listed
    # once (hf_state_shapes), so safetensors' refusal of shared tensors never arises
    state = {k: p.detach()[:shape[0]].float().cpu().contiguous()
             for k, (p, shape) in hf_state_shapes(model).items()}
    try:
        # format=pt: what transformers writes, and what its 4.x loader requires
        save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    except SafetensorError as e:  # safetensors reports I/O failures (disk full) as its own
        raise OSError(str(e).removeprefix("Error while serializing: ")) from None
    umask = os.umask(0)  # the one way to read the umask is to set it, then set it back
    os.umask(umask)
    os.chmod(path / "model.safetensors", 0o666 & ~umask)  # safetensors makes it 0600
    hf = config_to_hf(model.cfg, **{**getattr(model, "hf_extra", {}), **extra_config})
    (path / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    # transformers' generate() takes its stop id from generation_config.json
    generation = {k: hf[k] for k in ("bos_token_id", "eos_token_id") if k in hf}
    (path / "generation_config.json").write_text(json.dumps(generation, indent=2))
