"""Text sources, their weighted mixture, packing into fixed blocks, rank sharding, exact resume.

A source is a Hugging Face dataset streamed by name (`hf:HuggingFaceFW/fineweb-2:kor_Hang`) or
local files (.txt, .jsonl/.json, .parquet, optionally .gz; a file, folder or glob). Both become a
`datasets.IterableDataset`, split across ranks with `split_dataset_by_node` and resumed from its
`state_dict()`. Documents are tokenized in batches, joined with EOS (SmolLM2 adds no BOS) and cut
into seq_len + 1 token blocks; each block comes from one source, drawn by weight.

    python data.py [TOKENIZER_DIR]   # benchmark: packed tokens/s on one core
"""
import glob
import gzip
import json
import os
import random
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
BUNDLED = {name: str(ROOT / "data" / f"{name}.jsonl")
           for name in ("ko_train", "ko_eval", "en_train", "en_eval")}
LOCAL_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
EOS_TOKEN = "<|endoftext|>"  # SmolLM2's document separator in pre-training; it adds no BOS


@dataclass
class Source:
    name: str
    path: str  # "hf:dataset[:config[:split]]", or a local file, folder or glob
    text_field: str = "text"


def parse_weights(spec: str) -> dict:
    """'ko=0.9,en=0.1' -> {'ko': 0.9, 'en': 0.1}, every weight > 0, normalised to sum 1."""
    weights = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, value = part.partition("=")
        try:
            weights[name.strip()] = float(value)
        except ValueError:
            raise ValueError(f"mixture entry {part!r} is not name=weight, e.g. 'ko=0.9,en=0.1'")
    bad = [n for n, w in weights.items() if not w > 0]
    if not weights or bad:
        raise ValueError(f"mixture {spec!r}: every source needs a weight > 0 "
                         f"({', '.join(bad) or 'none given'}); drop a source to leave it out")
    total = sum(weights.values())
    return {n: w / total for n, w in weights.items()}

# ----------------------------------------------------------------------------------------------
# Reading documents


def file_kind(file: str) -> str:
    """.txt, .jsonl, .json or .parquet, through a .gz and other dots in the name."""
    return Path(file.removesuffix(".gz")).suffix


def local_files(spec: str) -> list:
    """The data files a path, folder or glob names, sorted; an error if there are none."""
    path = Path(spec).expanduser()
    found = ([str(path)] if path.is_file() else
             sorted(str(p) for p in path.rglob("*") if p.is_file()) if path.is_dir() else
             sorted(glob.glob(str(path), recursive=True)))
    files = [f for f in found if file_kind(f) in LOCAL_SUFFIXES]
    if not files:
        what = "has no .txt/.jsonl/.json/.parquet files" if found else "matches no files"
        raise FileNotFoundError(f"data path {spec!r} {what}; pass a file, folder or glob of "
                                "text, or hf:NAME[:CONFIG[:SPLIT]] for a hub dataset")
    if any(f.endswith(".parquet.gz") for f in files):
        raise ValueError(f"data path {spec!r} holds gzipped parquet, which cannot be streamed; "
                         "gunzip it (parquet compresses its columns itself)")
    if len({file_kind(f) for f in files}) > 1:
        raise ValueError(f"data path {spec!r} mixes file types; give each type its own source")
    return files


def read_local(files: list, text_field: str):
    """Documents of .txt (blank-line separated paragraphs) or JSON-lines files.

    Invalid UTF-8 bytes are dropped and counted in each document's `bad_bytes`."""
    for file in files:
        opener = gzip.open if file.endswith(".gz") else open
        is_json = file_kind(file) in (".json", ".jsonl")
        with opener(file, "rb") as f:
            para, para_bad = [], 0
            for n, raw in enumerate(f, 1):
                line = raw.decode("utf-8", errors="ignore")
                bad = len(raw) - len(line.encode("utf-8"))
                if is_json and line.strip():
                    yield {text_field: json_text(line, text_field, file, n), "bad_bytes": bad}
                elif not is_json and line.strip():
                    para.append(line)
                    para_bad += bad
                elif para:
                    yield {text_field: "".join(para).rstrip("\n"), "bad_bytes": para_bad}
                    para, para_bad = [], 0
            if para:
                yield {text_field: "".join(para).rstrip("\n"), "bad_bytes": para_bad}


def json_text(line: str, field: str, file: str, n: int) -> str:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{file} line {n} is not valid JSON ({e.msg}); JSONL wants one object "
                         "per line") from None
    text = obj.get(field) if isinstance(obj, dict) else None
    if not isinstance(text, str):
        keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise ValueError(f"{file} line {n} has no text field {field!r} (it has {keys}); set "
                         "the source's text field to the key that holds the text")
    return text


def open_source(src: Source, rank: int = 0, world_size: int = 1):
    """A datasets.IterableDataset of documents for this rank's share of them."""
    from datasets import IterableDataset, load_dataset
    from datasets.distributed import split_dataset_by_node
    if src.path.startswith("hf:"):
        name, config, split = (src.path[3:].split(":") + ["", ""])[:3]
        ds = load_dataset(name, config or None, split=split or "train", streaming=True)
    else:
        files = local_files(src.path)
        if file_kind(files[0]) == ".parquet":
            ds = load_dataset("parquet", data_files=files, split="train", streaming=True)
        else:
            ds = IterableDataset.from_generator(
                read_local, gen_kwargs={"files": files, "text_field": src.text_field})
    return split_dataset_by_node(ds, rank, world_size) if world_size > 1 else ds


def text_of(example: dict, src: Source) -> str:
    """The document text of one example, checked."""
    key = src.text_field
    text = example.get(key)
    if not isinstance(text, str):
        raise ValueError(f"source {src.name} ({src.path}) has no text field {key!r}; its fields "
                         f"are {sorted(example)}: set the source's text field")
    return text


def iter_texts(paths: list, text_field: str = "text", progress: bool = False):
    """Every document of the given sources, in order (for tokenizer training and eval sets)."""
    from tqdm import tqdm
    for path in paths:
        src = Source(Path(path).stem, path, text_field)
        docs = (text_of(ex, src) for ex in open_source(src))
        yield from tqdm(docs, desc=f"reading {path}", unit=" docs", disable=not progress)


def eval_docs(path: str, max_bytes: int, text_field: str = "text") -> list:
    """The first documents of path holding at most max_bytes of UTF-8 (a fixed eval set)."""
    docs, total = [], 0
    for text in iter_texts([path], text_field):
        size = len(text.encode("utf-8"))
        if total + size > max_bytes:
            if not docs:  # a single long document: cut at a character boundary
                docs.append(text.encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore"))
            break
        docs.append(text)
        total += size
    if not docs or not any(d.strip() for d in docs):
        raise ValueError(f"eval source {path!r} has no text")
    return docs

# ----------------------------------------------------------------------------------------------
# Packing and the mixture


class PackedStream:
    """One source's documents tokenized in batches and joined with EOS into a token buffer."""

    def __init__(self, src: Source, tokenizer, eos_id: int, rank=0, world_size=1, batch_docs=64):
        self.src, self.tokenizer, self.eos_id, self.batch_docs = src, tokenizer, eos_id, batch_docs
        self.ds = open_source(src, rank, world_size)
        self.iterator, self.epoch, self.buffer = None, 0, []
        self.docs = self.bad_bytes = 0

    def take(self, n: int) -> list:
        """The next n tokens of the stream."""
        while len(self.buffer) < n:
            self._refill()
        out, self.buffer = self.buffer[:n], self.buffer[n:]
        return out

    def _refill(self):
        texts, restarted = [], False
        if self.iterator is None:
            self.iterator = iter(self.ds)
        while len(texts) < self.batch_docs:
            try:
                example = next(self.iterator)
            except StopIteration:
                if texts:
                    break
                if restarted or self.docs == 0:
                    raise ValueError(f"source {self.src.name} ({self.src.path}) has no text for "
                                     "this rank; give it more documents or use fewer ranks")
                self.epoch, restarted = self.epoch + 1, True  # a small corpus: go round again
                self.ds.set_epoch(self.epoch)
                self.iterator = iter(self.ds)
                continue
            if example.get("bad_bytes"):
                if not self.bad_bytes:
                    warnings.warn(f"source {self.src.name}: invalid UTF-8 bytes skipped")
                self.bad_bytes += example["bad_bytes"]
            text = text_of(example, self.src)
            if text:
                texts.append(text)
        self.docs += len(texts)
        encode = getattr(self.tokenizer, "encode_batch_fast", self.tokenizer.encode_batch)
        for enc in encode(texts, add_special_tokens=False):  # _fast: no offsets, ~30% quicker
            self.buffer.extend(enc.ids)
            self.buffer.append(self.eos_id)

    def state_dict(self) -> dict:
        return {"dataset": self.ds.state_dict(), "epoch": self.epoch, "buffer": list(self.buffer),
                "docs": self.docs, "bad_bytes": self.bad_bytes}

    def load_state_dict(self, state: dict):
        self.epoch, self.buffer = state["epoch"], list(state["buffer"])
        self.docs, self.bad_bytes = state["docs"], state["bad_bytes"]
        self.ds.set_epoch(self.epoch)
        self.ds.load_state_dict(state["dataset"])
        self.iterator = None


class Mixture:
    """Batches of (inputs, targets), each block drawn from one source with the given weights."""

    def __init__(self, sources: dict, weights: dict, tokenizer, eos_id: int, seq_len: int,
                 batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        missing = sorted(set(weights) - set(sources))
        if missing:
            raise ValueError(f"mixture names source(s) {missing} that are not configured; "
                             f"known: {sorted(sources)}")
        self.weights, self.seq_len, self.batch_size = weights, seq_len, batch_size
        self.seed, self.rank, self.blocks = seed, rank, 0
        self.streams = {n: PackedStream(sources[n], tokenizer, eos_id, rank, world_size)
                        for n in weights}
        self.counts = dict.fromkeys(weights, 0)

    def pick(self) -> str:
        """The source of the next block: a pure function of (seed, rank, block index)."""
        u = random.Random(f"{self.seed}-{self.rank}-{self.blocks}").random()
        for name, w in self.weights.items():
            u -= w
            if u < 0:
                return name
        return name

    def next_batch(self):
        """(inputs, targets), each a (batch_size, seq_len) int64 tensor."""
        rows = []
        for _ in range(self.batch_size):
            name = self.pick()
            rows.append(self.streams[name].take(self.seq_len + 1))
            self.counts[name] += 1
            self.blocks += 1
        block = torch.tensor(rows, dtype=torch.long)
        return block[:, :-1], block[:, 1:]

    def realised(self) -> dict:
        """The share of blocks each source has given so far."""
        return {n: c / max(self.blocks, 1) for n, c in self.counts.items()}

    def state_dict(self) -> dict:
        return {"blocks": self.blocks, "counts": dict(self.counts),
                "streams": {n: s.state_dict() for n, s in self.streams.items()}}

    def load_state_dict(self, state: dict):
        self.blocks, self.counts = state["blocks"], dict(state["counts"])
        for name, stream in self.streams.items():
            stream.load_state_dict(state["streams"][name])


def benchmark(tokenizer_dir: str, seconds: float = 10.0) -> float:
    """Packed tokens per second from the bundled Korean corpus on one core."""
    import time

    from tokenizers import Tokenizer
    os.environ["RAYON_NUM_THREADS"] = "1"  # tokenizers' thread pool, read at first use
    tok = Tokenizer.from_file(str(Path(tokenizer_dir) / "tokenizer.json"))
    mix = Mixture({"ko": Source("ko", BUNDLED["ko_train"])}, {"ko": 1.0}, tok,
                  tok.token_to_id(EOS_TOKEN), seq_len=2048, batch_size=8)
    mix.next_batch()  # warm-up
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        n += mix.next_batch()[0].numel()
    return n / (time.perf_counter() - t0)


if __name__ == "__main__":
    import sys

    from convert_gguf import OFFLINE_BASE, resolve_base
    tokenizer_dir = sys.argv[1] if len(sys.argv) > 1 else str(resolve_base(OFFLINE_BASE))
    rate = benchmark(tokenizer_dir)
    # Each rank runs its own stream for its own GPU. Need: a T4 at 30% of its 65 TFLOP/s FP16
    # peak, 6N FLOPs per token for N = 140M (SmolLM2-135M with the merged vocabulary).
    need = 65e12 * 0.3 / (6 * 140e6)
    print(f"packed stream: {rate:,.0f} tokens/s on one core; one T4 trains at most "
          f"~{need:,.0f} tokens/s: {rate / need:.0f}x the need")
