"""Write a Hugging Face folder (ours or any SmolLM2/Llama one) as a GGUF file for llama.cpp: the
command-line face of gguf_io.write_gguf.

    python export_gguf.py HF_FOLDER OUT.gguf [--dtype f16|f32|q8_0]
    python export_gguf.py runs/demo OUT.gguf    # a run folder: its final or newest model

A run writes its own final.gguf as its last stage (final.py); this is for another type, another
name, or a run still training. `python convert_gguf.py OUT.gguf` reads the file back.
"""
import argparse
import sys
from pathlib import Path

from atomic import atomic_file, disk_errors
from gguf_io import write_gguf
from checkpoint import checkpoint_damage
from hf_io import model_folder, tokenizer_folder


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("folder", help="a Hugging Face model folder, or a bori run folder")
    p.add_argument("out", help="the .gguf file to write")
    p.add_argument("--dtype", default="f16", choices=["f16", "q8_0", "f32"],
                   help="matrices' type; norms stay f32 (default: f16)")
    p.add_argument("--name", default="", help="general.name in the file (default: the folder's)")
    args = p.parse_args(argv)
    try:
        folder = model_folder(args.folder)
        if folder.name.startswith("ckpt-") and (problem := checkpoint_damage(folder)):
            raise ValueError(f"checkpoint {folder} is damaged ({problem}); pass an older "
                             "checkpoint or a model folder")
        tok_dir = tokenizer_folder(folder)  # read before writing: a missing file is not a write
        # written whole or not at all: a killed export leaves no half file for llama.cpp
        with disk_errors(args.out), atomic_file(Path(args.out)) as tmp:
            write_gguf(folder, tmp, args.dtype, args.name, tok_dir=tok_dir)
        print(f"wrote {args.out} from {folder}")
    except (OSError, ValueError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
