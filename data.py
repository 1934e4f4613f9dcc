"""Text sources, their weighted mixture, packing into fixed blocks, rank sharding, exact resume.

A source is a Hugging Face dataset streamed by name (`hf:HuggingFaceFW/fineweb-2:kor_Hang`) or
local files (.txt, .jsonl/.json, .parquet, optionally .gz; a file, folder or glob). Both become a
`datasets.IterableDataset`, split across ranks with `split_dataset_by_node` and resumed from its
`state_dict()`. Documents are tokenized in batches, joined with EOS (SmolLM2 adds no BOS) and cut
into seq_len + 1 token blocks; each block comes from one source, drawn by weight.
`python bench.py` measures how fast the packed stream is against what a GPU trains.
"""
import hashlib
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from datasets import IterableDataset, load_dataset
from datasets.distributed import split_dataset_by_node
from tqdm import tqdm

from errors import CorpusError, about, warn
from readers import field_text, file_kind, local_files, read_local

ROOT = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Language:
    """A language the recipe knows: its name, fineweb-2's config for it, the rule for its new
    tokens (tokenizer.SCRIPTS), how many new tokens to merge, and prompts to sample at each
    phase's end."""
    name: str
    fineweb2: str
    script: str
    new_tokens: int
    prompts: str


LANGUAGES = {  # another language: one line here (and its script in tokenizer.SCRIPTS)
    "ko": Language(name="Korean", fineweb2="kor_Hang", script="hangul", new_tokens=8981,
                   prompts="대한민국의 수도는|옛날 옛적에 한 마을에"),
    "ja": Language(name="Japanese", fineweb2="jpn_Jpan", script="japanese", new_tokens=8981,
                   prompts="日本の首都は|昔々、ある村に"),
    # Vietnamese writes one syllable per word: a few thousand syllables cover the language
    "vi": Language(name="Vietnamese", fineweb2="vie_Latn", script="vietnamese", new_tokens=3000,
                   prompts="Thủ đô của Việt Nam là|Ngày xửa ngày xưa, ở một ngôi làng"),
}
# the offline corpora in data/ (demo presets, tests): LANG_train.jsonl, LANG_eval.jsonl
BUNDLED = {f"{lang}_{part}": str(ROOT / "data" / f"{lang}_{part}.jsonl")
           for lang in (*LANGUAGES, "en") for part in ("train", "eval")}


def language_name(code: str) -> str:
    """'ko' -> 'Korean', 'en' -> 'English', for messages and the model card; else the code."""
    return LANGUAGES[code].name if code in LANGUAGES else "English" if code == "en" else code


EOS_TOKEN = "<|endoftext|>"  # SmolLM2's document separator in pre-training; it adds no BOS


@dataclass(frozen=True)
class Corpus:
    """One language's text in a run: the source it trains on and the one its held-out score
    reads, with the options that name them (for messages). bori.sources(cfg) lists them."""
    name: str  # what a mix names: the language's code, "ko" or "en"
    train: str  # a data spec: "hf:NAME[:CONFIG[:SPLIT]]" or local files, "#KEY" allowed
    held_out: str
    train_flag: str  # "data_new"
    held_out_flag: str  # "eval_new"
    script: str = ""  # what its letters are mostly in: a tokenizer.SCRIPTS name or "latin"


@dataclass
class Source:
    """One stream of documents as the mixture reads it."""
    name: str
    path: str  # "hf:dataset[:config[:split]]", or a local file, folder or glob; "#KEY" at the
    text_field: str = "text"  # end of path names the text's JSON key instead of this
    flag: str = ""  # the option that names it, for messages

    def __post_init__(self):
        if "#" in self.path and not Path(self.path).exists():  # a file named a#b stays a file
            self.path, self.text_field = self.path.rsplit("#", 1)


def parse_weights(spec: str) -> dict:
    """'ko=0.9,en=0.1' -> {'ko': 0.9, 'en': 0.1}, every weight > 0, normalised to sum 1."""
    weights = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, value = part.partition("=")
        if name.strip() in weights:
            raise ValueError(f"mixture {spec!r} names {name.strip()!r} twice; give each source "
                             "once")
        try:
            weights[name.strip()] = float(value)
        except ValueError:
            raise ValueError(f"mixture entry {part!r} is not name=weight, e.g. 'ko=0.9,en=0.1'")
    bad = [n for n, w in weights.items() if not w > 0]
    if not weights or bad:
        raise ValueError(f"mixture {spec!r}: every source needs a weight > 0 "
                         f"({', '.join(bad) or 'none given'}); drop a source to leave it out")
    total = sum(weights.values())
    return {n: w / total for n, w in weights.items()}  # so "ko=9,en=1" means the same

# ----------------------------------------------------------------------------------------------
# Reading documents


def open_source(src: Source, rank: int = 0, world_size: int = 1):
    """A datasets.IterableDataset of documents for this rank's share of them."""
    if src.path.startswith("hf:"):
        name, config, split = (src.path[3:].split(":") + ["", ""])[:3]
        # streaming: only what is read is downloaded (fineweb-2's Korean alone is many GB)
        ds = load_dataset(name, config or None, split=split or "train", streaming=True)
    else:
        files = local_files(src.path)
        if file_kind(files[0]) == ".parquet":
            ds = load_dataset("parquet", data_files=files, split="train", streaming=True)
        else:  # readers.py: blank-line documents, long ones in pieces, bad bytes counted
            ds = IterableDataset.from_generator(
                read_local, gen_kwargs={"files": files, "text_field": src.text_field})
    if world_size == 1:
        return ds
    if src.path.startswith("hf:"):
        # a hub dataset's files are shards of about one size: whole shards per rank when their
        # count divides world_size (each rank downloads only its own), else every
        # world_size-th example
        return split_dataset_by_node(ds, rank, world_size)
    # Local files can differ in size: shard by shard, a rank given a 2-document file next to
    # another's 1,200 would read its 2 round and round. Every rank reads every file and keeps
    # every world_size-th document instead: equal shares, disjoint, and resumable (the
    # filter's position is part of the dataset's state_dict).
    return ds.filter(lambda _, index: index % world_size == rank, with_indices=True)


def text_of(example: dict, src: Source) -> str:
    """The document text of one example, checked (readers.field_text says what is wrong)."""
    return field_text(example, src.text_field, src.path, src.path)


def iter_pieces(path: str, text_field: str = "text", progress: bool = False):
    """(text, ends its document) of a source in order; a long document comes in pieces."""
    src = Source(Path(path).stem, path, text_field)
    for ex in tqdm(open_source(src), desc=f"reading {path}", unit=" docs", disable=not progress):
        yield text_of(ex, src), ex.get("doc_end", True)


def iter_texts(paths: list, text_field: str = "text", progress: bool = False):
    """The text of the given sources in order, document by document (a long one in pieces)."""
    for path in paths:
        yield from (text for text, _ in iter_pieces(path, text_field, progress))


def text_key(text: str) -> bytes:
    """What identifies an example's text: a 16-byte BLAKE2b digest (RFC 7693) of its UTF-8.
    Held-out text is kept out of training by these keys, whatever the source's spelling."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


def eval_docs(path: str, max_bytes: int, text_field: str = "text", keys: bool = False):
    """The first documents of path holding at most max_bytes of UTF-8 (a fixed eval set); with
    keys, also the text_key of every example they took, which every training stream and the
    BPE leave out: held out by content, on every rank, however the source is spelled."""
    docs, total, parts, taken = [], 0, [], set()
    for piece, doc_end in iter_pieces(path, text_field):
        parts.append(piece)
        if not doc_end and sum(map(len, parts)) <= max_bytes:  # chars <= bytes: read on
            continue
        text, pieces, parts = "".join(parts), parts, []
        size = len(text.encode("utf-8"))
        if total + size > max_bytes:
            if not docs:  # a single long document: cut at a character boundary
                docs.append(text.encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore"))
                taken.update(map(text_key, pieces))
            break
        docs.append(text)
        total = total + size
        taken.update(map(text_key, pieces))
    if not docs or not any(d.strip() for d in docs):
        raise ValueError(f"eval source {path!r} has no text")
    return (docs, frozenset(taken)) if keys else docs


def training_source(corpus: Corpus, text_field: str) -> Source:
    """The source a corpus trains on (what is held out is left out by content: PackedStream)."""
    return Source(corpus.name, corpus.train, text_field, flag=corpus.train_flag)

# ----------------------------------------------------------------------------------------------
# Packing and the mixture


class PackedStream:
    """One source's documents tokenized in batches and joined with EOS into a token buffer."""

    def __init__(self, src: Source, tokenizer, eos_id: int, rank=0, world_size=1, batch_docs=64,
                 batch_chars=2**18, held_out: frozenset = frozenset()):
        self.src, self.tokenizer, self.eos_id = src, tokenizer, eos_id
        self.batch_docs, self.batch_chars = batch_docs, batch_chars  # what one refill reads
        self.ds, self.rank, self.world_size = open_source(src, rank, world_size), rank, world_size
        self.iterator, self.epoch, self.buffer = None, 0, []
        self.restored = None  # a loaded dataset position, until the stream reads again
        # text_keys of the held-out examples: checked on every rank, after the split, so no
        # rank trains on them whatever share of the source it reads
        self.held_out = held_out
        self.docs = self.bad_bytes = self.left_out = 0

    def take(self, n: int) -> list:
        """The next n tokens of the stream."""
        while len(self.buffer) < n:
            with about(self.src.flag or self.src.name):  # say which option names the source
                self._refill()
        out, self.buffer = self.buffer[:n], self.buffer[n:]
        return out

    def _refill(self):
        """Read about batch_docs documents (batch_chars characters), tokenize them in one call,
        and append their ids to the buffer, each document followed by EOS."""
        texts, size, restarted = [], 0, False
        if self.iterator is None:
            self.iterator, self.restored = iter(self.ds), None
        while len(texts) < self.batch_docs and size < self.batch_chars:
            try:
                example = next(self.iterator)
            except StopIteration:
                if texts:
                    break
                # this rank's share alone: a CorpusError, which this rank says (bori's
                # next_batches), while the others stop quietly
                if self.docs == 0 and self.left_out:  # going round again would loop forever
                    raise CorpusError(f"all of the text of {self.src.path} that this rank reads "
                                      "is held out for evaluation; give it more documents or "
                                      "hold out other text (eval_new, eval_en)")
                if restarted or self.docs == 0:
                    raise CorpusError(f"source {self.src.name} ({self.src.path}) has no text "
                                      f"for rank {self.rank}; give it more documents (at least "
                                      "one per process) or use fewer processes")
                self.epoch, restarted = self.epoch + 1, True  # a small corpus: go round again
                # every rank says it of its own share: with unequal files one rank can repeat
                # its small share many times while another has not finished its first pass
                share = f" (rank {self.rank}'s share)" if self.world_size > 1 else ""
                warn(f"--{self.src.flag or self.src.name} ({self.src.path}){share} is read to "
                     f"its end: going round again (pass {self.epoch + 1}), so its text repeats")
                # from the second pass on, datasets reorders a many-file source's files by a
                # permutation seeded by the epoch: the same on every rank, so each pass's
                # shares stay disjoint, though a rank's share may differ from pass to pass
                self.ds.set_epoch(self.epoch)
                self.iterator = iter(self.ds)
                continue
            if example.get("bad_bytes"):
                if not self.bad_bytes:
                    warn(f"source {self.src.name} ({self.src.path}): invalid UTF-8 bytes "
                         "skipped (their count is in the phase's DONE.json)")
                self.bad_bytes += example["bad_bytes"]
            text = text_of(example, self.src)
            if self.held_out and text_key(text) in self.held_out:
                self.left_out += 1  # counted in the phase's DONE.json
                continue
            if text:  # EOS after a document's last piece
                texts.append((text, example.get("doc_end", True)))
                size += len(text)
        self.docs += sum(end for _, end in texts)  # whole documents: their last pieces
        # encode_batch_fast computes no offsets: ~30% quicker
        encode = getattr(self.tokenizer, "encode_batch_fast", self.tokenizer.encode_batch)
        encodings = encode([text for text, _ in texts], add_special_tokens=False)
        for enc, (_, doc_end) in zip(encodings, texts):
            self.buffer.extend(enc.ids)
            if doc_end:
                self.buffer.append(self.eos_id)

    def state_dict(self) -> dict:
        # A restored datasets.IterableDataset reports its start, not the restored position,
        # until it is iterated again: so until this stream reads, the restored one stands.
        dataset = self.ds.state_dict() if self.restored is None else self.restored
        # the buffer: tokens read but not yet given out, which a resume must give out first
        return {"dataset": dataset, "epoch": self.epoch, "buffer": list(self.buffer),
                "docs": self.docs, "bad_bytes": self.bad_bytes, "left_out": self.left_out}

    def load_state_dict(self, state: dict):
        self.epoch, self.buffer = state["epoch"], list(state["buffer"])
        self.docs, self.bad_bytes = state["docs"], state["bad_bytes"]
        self.left_out = state.get("left_out", 0)  # absent from a checkpoint of older bori
        self.ds.set_epoch(self.epoch)
        self.ds.load_state_dict(state["dataset"])
        self.iterator, self.restored = None, state["dataset"]


class Mixture:
    """Batches of (inputs, targets), each block drawn from one source with the given weights."""

    def __init__(self, sources: dict, weights: dict, tokenizer, eos_id: int, seq_len: int,
                 batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 held_out: frozenset = frozenset()):
        missing = sorted(set(weights) - set(sources))
        if missing:
            raise ValueError(f"mixture names source(s) {missing} that are not configured; "
                             f"known: {sorted(sources)}")
        self.weights, self.seq_len, self.batch_size = weights, seq_len, batch_size
        self.seed, self.rank, self.blocks = seed, rank, 0
        self.streams = {n: PackedStream(sources[n], tokenizer, eos_id, rank=rank,
                                        world_size=world_size, held_out=held_out)
                        for n in weights}
        self.counts = dict.fromkeys(weights, 0)

    def pick(self) -> str:
        """The source of the next block: a pure function of (seed, rank, block index)."""
        # no generator state to save: a resume needs only the block count
        u = random.Random(f"{self.seed}-{self.rank}-{self.blocks}").random()
        for name, w in self.weights.items():
            u -= w
            if u < 0:
                return name
        return name  # u left >= 0 by float rounding alone: the last source

    def next_batch(self):
        """(inputs, targets), each a (batch_size, seq_len) int64 tensor."""
        rows = []
        for _ in range(self.batch_size):
            name = self.pick()
            rows.append(self.streams[name].take(self.seq_len + 1))
            self.counts[name] += 1
            self.blocks += 1
        block = torch.tensor(rows, dtype=torch.long)
        return block[:, :-1], block[:, 1:]  # seq_len + 1 tokens: seq_len shifted targets

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
