"""Write a Hugging Face folder (ours or any SmolLM2/Llama one) as a GGUF file for llama.cpp.

    python export_gguf.py HF_FOLDER OUT.gguf [--dtype f16|f32]

Tensors get llama.cpp's names, Q and K rows its interleaved RoPE order (the inverse of what
convert_gguf.py undoes), norms stay F32; the merged byte-level BPE goes in as gpt2-type tokens,
merges and token types with the special ids. `python convert_gguf.py OUT.gguf` reads it back.
"""
import argparse
import json
import shutil
import sys
from pathlib import Path

import gguf
import numpy as np

import report
from atomic import atomic_dir, atomic_file, disk_errors
from checkpoint import prune_stage, read_json
from convert_gguf import GGUF_TO_HF, rope_permute
from hf_io import model_folder, read_safetensors
from tokenizer import full_vocab, merge_pairs

HF_TO_GGUF = {hf: gg for gg, hf in GGUF_TO_HF.items()}


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
    vocab = full_vocab(tok)
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


def export(folder, out, dtype: str = "f16", name: str = "") -> Path:
    """Write folder's weights and tokenizer to out (GGUF, llama architecture): matrices in
    dtype (f16, f32, or q8_0 by the gguf package's own quantiser), norms in f32."""
    folder, out = Path(folder), Path(out)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no config.json: pass an exported model folder")
    hf = json.loads((folder / "config.json").read_text())
    n_head, n_kv = hf["num_attention_heads"], hf.get("num_key_value_heads",
                                                     hf["num_attention_heads"])
    tok = tokenizer_fields(folder)
    if len(tok["tokens"]) != hf["vocab_size"]:
        raise ValueError(f"{folder}: the tokenizer has {len(tok['tokens'])} tokens, config.json "
                         f"{hf['vocab_size']}; llama.cpp needs them equal")
    rope = hf.get("rope_theta") or hf.get("rope_parameters", {}).get("rope_theta", 10000.0)
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_name(name or folder.name)
    w.add_context_length(hf["max_position_embeddings"])
    w.add_embedding_length(hf["hidden_size"])
    w.add_block_count(hf["num_hidden_layers"])
    w.add_feed_forward_length(hf["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_dimension_count(hf["hidden_size"] // n_head)
    w.add_rope_freq_base(float(rope))
    w.add_layer_norm_rms_eps(float(hf["rms_norm_eps"]))
    w.add_vocab_size(hf["vocab_size"])
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
    w.add_add_bos_token(False)
    tok_cfg = folder / "tokenizer_config.json"
    if tok_cfg.is_file() and "chat_template" in json.loads(tok_cfg.read_text()):
        w.add_chat_template(json.loads(tok_cfg.read_text())["chat_template"])
    for name, tensor in sorted(read_safetensors(folder).items()):
        if name == "lm_head.weight" and hf.get("tie_word_embeddings"):
            continue
        a = tensor.float().numpy()
        if name.endswith("q_proj.weight"):
            a = rope_permute(a, n_head)
        elif name.endswith("k_proj.weight"):
            a = rope_permute(a, n_kv)
        if dtype == "q8_0" and a.ndim == 2:
            q8 = gguf.GGMLQuantizationType.Q8_0
            w.add_tensor(gguf_tensor_name(name), gguf.quants.quantize(a, q8), raw_dtype=q8)
        else:
            w.add_tensor(gguf_tensor_name(name),
                         a.astype(np.float16) if dtype == "f16" and a.ndim == 2 else a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def export_run(model_dir: Path, run: Path):
    """A run's last stage: run/final (Hugging Face folder with a model card), run/final.gguf and
    run/plots/, each written whole or not at all; then, unless keep_stage_models, the stages'
    own model copies go (the final folder holds the model); then the summary."""
    cfg = read_json(run / "config.json", "run bori again to rewrite it")
    if not (run / "final" / "config.json").is_file():
        if not (model_dir / "model.safetensors").is_file():
            raise FileNotFoundError(f"{run / 'final'} and {model_dir} are both gone; delete "
                                    f"{model_dir.parent} to train that phase again")
        with disk_errors(run / "final"), atomic_dir(run / "final") as tmp:
            shutil.copytree(model_dir, tmp, dirs_exist_ok=True)
    with disk_errors(f"the model card or plots in {run}"):
        report.write(run)
    if not (run / "final.gguf").is_file():
        with disk_errors(run / "final.gguf"), atomic_file(run / "final.gguf") as tmp:
            export(run / "final", tmp, cfg.get("gguf_type", "f16"), f"bori-{run.name}")
    if not cfg.get("keep_stage_models", True):
        for stage, names in (("init", ["model.safetensors"]), ("phase1a", ["model"]),
                             ("phase1b", ["model"])):
            prune_stage(run / stage, names)
    report.summary(run)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("folder", help="a Hugging Face model folder, or a bori run folder")
    p.add_argument("out", help="the .gguf file to write")
    p.add_argument("--dtype", default="f16", choices=["f16", "q8_0", "f32"],
                   help="matrices' type; norms stay f32 (default: f16)")
    p.add_argument("--name", default="", help="general.name in the file (default: the folder's)")
    args = p.parse_args()
    try:
        folder = model_folder(args.folder)
        with disk_errors(args.out), atomic_file(Path(args.out)) as tmp:
            export(folder, tmp, args.dtype, args.name)
        print(f"wrote {args.out} from {folder}")
    except (OSError, ValueError) as e:
        sys.exit(f"error: {e}")
