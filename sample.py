"""Generate text from a model folder or a run, with tokens per second.

    python sample.py runs/demo --prompt "대한민국의 수도는" --prompt "The capital of"
    python sample.py runs/demo/final --temperature 0 --max_tokens 64

A run folder means its final model, or while it trains its newest phase model or checkpoint.
Temperature 0 is greedy; otherwise top-k, then nucleus sampling (Holtzman et al. 2019,
arXiv:1904.09751), in model.sample. Compare speeds in characters, not tokens: a merged Korean
token holds about 3 characters, a base token 0.53.
"""
import argparse
import sys
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer

from data import EOS_TOKEN
from checkpoint import checkpoint_damage
from hf_io import from_pretrained, model_folder, tokenizer_folder


def at_least(low: float, kind=float):
    """An argparse type: a number of `kind` that is >= low."""
    # as a type=, a bad value is argparse's usage error (exit 2), not a traceback in generate
    def parse(text: str):
        value = kind(text)
        if not value >= low:  # not `value < low`: nan compares false both ways, and is refused
            raise argparse.ArgumentTypeError(f"{text} is below {low}")
        return value
    return parse


def prompt_ids(tok, prompt: str, max_seq_len: int, max_tokens: int) -> list:
    """The prompt's ids, as generation can take them: an empty prompt starts from EOS, where
    every training document starts (SmolLM2 has no BOS); a prompt too long for the context
    keeps its last tokens, leaving room for max_tokens new ones (and says so)."""
    ids = tok.encode(prompt).ids or [tok.token_to_id(EOS_TOKEN)]
    room = max(max_seq_len - max_tokens, 1)
    if len(ids) > room:
        print(f"(the prompt's {len(ids):,} tokens and {max_tokens:,} new ones pass the model's "
              f"{max_seq_len:,} positions: it continues from the prompt's last {room:,} tokens)")
        ids = ids[-room:]
    return ids


def main(argv=None):
    """Load the model and its tokenizer, then print each prompt's continuation and speed."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("folder", help="a model folder, or a run folder (its final model)")
    p.add_argument("--prompt", action="append", help="repeatable; default: a Korean and an "
                   "English prompt")
    p.add_argument("--max_tokens", type=at_least(1, int), default=64, help="tokens to add")
    p.add_argument("--temperature", type=at_least(0.0), default=0.8, help="0: greedy")
    p.add_argument("--top_k", type=at_least(0, int), default=0, help="0: no limit")
    p.add_argument("--top_p", type=at_least(0.0), default=0.9, help="nucleus sampling mass")
    p.add_argument("--seed", type=int, default=0, help="of the sampling")
    args = p.parse_args(argv)
    try:
        folder = model_folder(args.folder)
        if folder != Path(args.folder):
            print(f"model: {folder}")
        if folder.name.startswith("ckpt-") and (problem := checkpoint_damage(folder)):
            raise ValueError(f"checkpoint {folder} is damaged ({problem}); pass an older "
                             "checkpoint or a model folder")
        tok = Tokenizer.from_file(str(tokenizer_folder(folder) / "tokenizer.json"))
        model = from_pretrained(folder)
    except (OSError, ValueError) as e:
        sys.exit(f"error: {e}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()
    gen = torch.Generator(device=device).manual_seed(args.seed)  # same command, same text
    # <|endoftext|> ends a document; <|im_end|> ends a chat turn of an Instruct base such as
    # the offline SmolLM2-135M-Instruct; a base without it has no id for it (None), dropped
    eos = [i for i in (tok.token_to_id(EOS_TOKEN), tok.token_to_id("<|im_end|>")) if i is not None]
    # Korean shows what was learned, English what the 10% replay kept
    for prompt in args.prompt or ["대한민국의 수도는", "The capital of France is"]:
        idx = torch.tensor([prompt_ids(tok, prompt, model.cfg.max_seq_len, args.max_tokens)],
                           device=device)
        t0 = time.perf_counter()  # the prompt's pass included: what a user waits for
        out = model.generate(idx, args.max_tokens, temperature=args.temperature,
                             top_k=args.top_k, top_p=args.top_p, eos_ids=eos, generator=gen)
        # an EOS or the model's max_seq_len can stop it short of max_tokens
        n_new = out.shape[1] - idx.shape[1]
        rate = n_new / (time.perf_counter() - t0)
        print(f"{prompt}{tok.decode(out[0, idx.shape[1]:].tolist())}\n"
              f"  [{n_new} tokens, {rate:.1f} tokens/s]\n")


if __name__ == "__main__":
    main()
