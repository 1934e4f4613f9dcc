"""data.py: packing, rank sharding, exact resume, the mixture, file formats, held-out documents
and bad input."""
import gzip
import io
import json
import os
from types import SimpleNamespace
import re

import pytest
import torch

import bori
import data
from data import Mixture, PackedStream, Source
from helpers import write_source


EOS = 0


def write_jsonl(path, texts, field="text"):
    path.write_text("".join(json.dumps({field: t}, ensure_ascii=False) + "\n" for t in texts))
    return path


def docs(n, tag="문서"):
    return [f"{tag} {i}: " + "가나다 라마 바사. The cat sat. " * (1 + i % 5) for i in range(n)]


def stream_tokens(texts, tok):
    """The reference stream: every document's ids followed by EOS, computed one by one."""
    out = []
    for t in texts:
        out += tok.encode(t).ids + [EOS]
    return out


def take_blocks(mix, n_batches):
    rows = []
    for _ in range(n_batches):
        x, y = mix.next_batch()
        assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one
        rows += [torch.cat([xi, yi[-1:]]).tolist() for xi, yi in zip(x, y)]
    return rows


def test_blocks_decode_back_to_documents_joined_with_eos(tmp_path, base_tok):
    texts = docs(23)
    mix = Mixture({"ko": Source("ko", str(write_jsonl(tmp_path / "a.jsonl", texts)))},
                  {"ko": 1.0}, base_tok, EOS, seq_len=31, batch_size=3)
    flat = [t for row in take_blocks(mix, 40) for t in row]
    reference = stream_tokens(texts, base_tok)
    epochs = -(-len(flat) // len(reference))
    assert epochs >= 2  # the corpus is gone round more than once
    assert flat == (reference * epochs)[:len(flat)]
    assert mix.streams["ko"].epoch == epochs - 1


def test_two_ranks_see_every_document_once(tmp_path):
    texts = docs(41)
    for n_files in (1, 3):
        for i in range(n_files):
            write_jsonl(tmp_path / f"{n_files}_{i}.jsonl", texts[i::n_files])
        spec = str(tmp_path / f"{n_files}_*.jsonl")
        seen = [[ex["text"] for ex in data.open_source(Source("ko", spec), r, 2)] for r in (0, 1)]
        assert not set(seen[0]) & set(seen[1])
        assert sorted(seen[0] + seen[1]) == sorted(texts)


def test_resume_gives_the_batches_an_uninterrupted_stream_gives(tmp_path, base_tok):
    sources = {"ko": Source("ko", str(write_jsonl(tmp_path / "ko.jsonl", docs(30)))),
               "en": Source("en", str(write_jsonl(tmp_path / "en.jsonl", docs(9, "doc"))))}
    weights = {"ko": 0.7, "en": 0.3}

    def make():
        return Mixture(sources, weights, base_tok, EOS, seq_len=24, batch_size=2, seed=5)
    straight = make()
    expected = take_blocks(straight, 60)
    for k in (0, 7, 33):
        first = make()
        assert take_blocks(first, k) == expected[:2 * k]
        buf = io.BytesIO()
        torch.save(first.state_dict(), buf)  # as the trainer checkpoints it
        buf.seek(0)
        resumed = make()
        resumed.load_state_dict(torch.load(buf, weights_only=True))
        assert take_blocks(resumed, 60 - k) == expected[2 * k:], k


def test_realised_mixture_converges_to_weights(tmp_path, base_tok):
    sources = {"ko": Source("ko", str(write_jsonl(tmp_path / "ko.jsonl", docs(50)))),
               "en": Source("en", str(write_jsonl(tmp_path / "en.jsonl", docs(50, "doc"))))}
    mix = Mixture(sources, data.parse_weights("ko=0.9,en=0.1"), base_tok, EOS, seq_len=4,
                  batch_size=50, seed=1)
    for _ in range(100):
        mix.next_batch()
    share = mix.realised()
    assert mix.blocks == 5000
    assert abs(share["ko"] - 0.9) <= 0.02 and abs(share["en"] - 0.1) <= 0.02, share


def test_local_formats_give_the_same_documents(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    texts = docs(7)
    write_jsonl(tmp_path / "a.jsonl", texts)
    # a shard name with dots, as C4's and fineweb's: its type is the last suffix before .gz
    with gzip.open(tmp_path / "b.00000-of-00001.json.gz", "wt", encoding="utf-8") as f:
        f.write("".join(json.dumps({"body": t}) + "\n" for t in texts))
    (tmp_path / "c.txt").write_text("\n\n".join(t.replace(". ", ".\n") for t in texts) + "\n")
    pq.write_table(pa.table({"content": texts}), tmp_path / "d.parquet")
    (tmp_path / "folder").mkdir()
    write_jsonl(tmp_path / "folder" / "x.jsonl", texts[:3])
    write_jsonl(tmp_path / "folder" / "y.jsonl", texts[3:])
    cases = [("a.jsonl", "text"), ("b.*.json.gz", "body"), ("c.txt", "text"),
             ("d.parquet", "content"), ("folder", "text"), ("folder/*.jsonl", "text")]
    for spec, field in cases:
        got = list(data.iter_texts([str(tmp_path / spec)], field))
        want = [t.replace(". ", ".\n") for t in texts] if spec.endswith("txt") else texts
        assert [g.rstrip() for g in got] == [w.rstrip() for w in want], spec


def test_hub_sources_stream_through_load_dataset(monkeypatch, tmp_path):
    import datasets
    calls = []
    local = datasets.IterableDataset.from_generator(lambda: iter([{"text": "웹 문서"}]))

    def fake_load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        return local
    monkeypatch.setattr(data, "load_dataset", fake_load_dataset)
    got = list(data.iter_texts(["hf:HuggingFaceFW/fineweb-2:kor_Hang"]))
    assert got == ["웹 문서"]
    assert calls == [(("HuggingFaceFW/fineweb-2", "kor_Hang"),
                      {"split": "train", "streaming": True})]


def test_eval_docs_respect_the_byte_budget():
    texts = data.eval_docs(data.BUNDLED["ko_eval"], 8000)
    assert 0 < sum(len(t.encode()) for t in texts) <= 8000
    first = data.eval_docs(data.BUNDLED["ko_eval"], 10)
    assert len(first) == 1 and len(first[0].encode()) <= 10


def test_invalid_utf8_bytes_are_counted_and_skipped(tmp_path, base_tok, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"text": "good \xea\xb0\x80"}\n{"text": "bad \xff\xfe here"}\n'
                     b'{"text": "fine"}\n')
    stream = PackedStream(Source("ko", str(path)), base_tok, EOS)
    tokens = stream.take(5)
    assert "warning: source ko (" in capsys.readouterr().err
    assert stream.bad_bytes == 2
    assert base_tok.decode(stream.buffer and tokens + stream.buffer) == "good 가bad  herefine"


@pytest.mark.parametrize("content, spec, message", [
    (None, "missing/*.jsonl", "matches no files"),
    (b"", "empty.jsonl", "has no text for rank 0"),
    (b'{"content": "x"}\n', "nofield.jsonl", "line 1 has no text field 'text'"),
    (b'{"text": "a"}\n{"text": \n', "broken.jsonl", "line 2 is not valid JSON"),
    (b"\x1f\x8b", "shard.parquet.gz", "holds gzipped parquet, which cannot be streamed; gunzip"),
])
def test_bad_sources_have_clear_messages(tmp_path, base_tok, content, spec, message):
    if content is not None:
        (tmp_path / spec).write_bytes(content)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        PackedStream(Source("ko", str(tmp_path / spec)), base_tok, EOS).take(10)


@pytest.mark.parametrize("spec", ["ko=0.9,en=0", "ko=-1", "ko=abc", ""])
def test_bad_weights_have_clear_messages(spec):
    with pytest.raises(ValueError, match="weight"):
        data.parse_weights(spec)


def roundtrip(state: dict) -> dict:
    """A state as the trainer keeps it: through torch.save and torch.load."""
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_resume_at_every_batch_twice_over_equals_the_stream_across_an_epoch_wrap(tmp_path,
                                                                                 base_tok):
    """On each of 2 ranks: restore before every batch, save again at once, restore again (a
    double resume: a stream saved before it reads), across the corpus wrapping round."""
    # more documents per rank than a refill reads (64), so that refills stop inside an epoch
    sources = {"ko": Source("ko", str(write_jsonl(tmp_path / "ko.jsonl", docs(200)))),
               "en": Source("en", str(write_jsonl(tmp_path / "en.jsonl", docs(70, "doc"))))}

    def make(rank):
        return Mixture(sources, {"ko": 0.7, "en": 0.3}, base_tok, EOS, seq_len=64,
                       batch_size=4, seed=5, rank=rank, world_size=2)
    for rank in (0, 1):
        straight = make(rank)
        expected = take_blocks(straight, 60)
        assert straight.streams["ko"].epoch >= 1 and straight.streams["en"].epoch >= 1
        mix, got = make(rank), []
        for _ in range(60):
            for _ in range(2):
                state, mix = roundtrip(mix.state_dict()), make(rank)
                mix.load_state_dict(state)
            got += take_blocks(mix, 1)
        assert got == expected, rank


class TextIds:
    """A stand-in tokenizer: each text is one token, its index in texts; what a stream's
    buffer holds then names exactly the texts it trained on."""

    def __init__(self, texts: list):
        self.ids = {t: i for i, t in enumerate(texts)}

    def encode_batch_fast(self, texts: list, add_special_tokens: bool):
        return [SimpleNamespace(ids=[self.ids[t]]) for t in texts]

    encode_batch = encode_batch_fast


def rank_texts(src: data.Source, texts: list, rank: int, world_size: int,
               held_out: frozenset) -> list:
    """Every text one rank's stream trains on in its first pass over its share of the source."""
    stream = data.PackedStream(src, TextIds(texts), -1, rank=rank, world_size=world_size,
                               held_out=held_out)
    while stream.epoch == 0:
        stream._refill()  # one batch of documents; a second pass starts when the first ends
        if stream.epoch == 0:
            first_pass = [texts[i] for i in stream.buffer if i >= 0]
    return first_pass


@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
@pytest.mark.parametrize("n_files", [1, 2, 4])
def test_held_out_text_reaches_no_rank_of_a_source_that_is_also_eval(tmp_path, kind, n_files):
    """The seed's English: eval_en is data_en. With 4 files on 2 ranks, datasets splits by file,
    and a count of examples skipped before the split left 5 of 11 held-out documents in rank
    0's share; by content, none is trained on at 1, 2 or 3 processes, and nothing else is lost."""
    texts = [f"document {i}: " + "words of text " * (3 + i % 5) for i in range(48)]
    path = str(write_source(tmp_path / "src", kind, n_files, texts))
    held, keys = data.eval_docs(path, 600, keys=True)
    assert 5 <= len(held) < len(texts) and len(keys) == len(held)
    src = data.Source("en", path)
    for world_size in (1, 2, 3):
        shares = [rank_texts(src, texts, r, world_size, keys) for r in range(world_size)]
        trained = [t for share in shares for t in share]
        assert not set(held) & set(trained), (world_size, n_files)
        # the ranks' shares are disjoint and, with the held-out text, cover the source
        assert sorted(trained + held) == sorted(texts), (world_size, n_files)
    # without the keys, rank 0 of 1 trains on the held-out documents too: the check can fail
    assert set(held) <= set(rank_texts(src, texts, 0, 1, frozenset()))


def test_held_out_text_is_left_out_however_the_source_is_spelled(tmp_path, base_tok):
    """DIR/./x.jsonl, a relative path, a symlink and x.jsonl#text name one file: the held-out
    documents are left out by their text, so no spelling lets them into training."""
    texts = [f"문서 {i}: " + "가나다 " * (5 + i) for i in range(20)]
    path = tmp_path / "one.jsonl"
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts))
    (tmp_path / "link.jsonl").symlink_to(path)
    held, keys = data.eval_docs(str(path), 200, keys=True)
    assert 0 < len(held) < len(texts)
    relative = os.path.relpath(path)
    for spelling in (str(tmp_path / "." / "one.jsonl"), relative, str(tmp_path / "link.jsonl"),
                     f"{path}#text"):
        corpus = data.Corpus("ko", spelling, str(path), "data_new", "eval_new")
        stream = data.PackedStream(data.training_source(corpus, "text"), base_tok, 0,
                                   held_out=keys)
        first = stream.take(5)
        assert first == base_tok.encode(texts[len(held)]).ids[:5], spelling  # first not held
        assert stream.left_out == len(held), spelling


def test_a_source_held_out_entirely_is_one_sentence(tmp_path, base_tok):
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps({"text": "한 문서뿐입니다."}, ensure_ascii=False) + "\n")
    _, keys = data.eval_docs(str(path), 10_000, keys=True)
    stream = data.PackedStream(data.Source("ko", str(path), flag="data_new"), base_tok, 0,
                               held_out=keys)
    with pytest.raises(ValueError, match=r"--data_new: all of the text of .*one.jsonl that this "
                       r"rank reads is held out for evaluation"):
        stream.take(10)


def test_warnings_a_user_needs(tmp_path, base_tok, capsys):
    path = tmp_path / "small.jsonl"
    path.write_text("".join(json.dumps({"text": f"짧은 문서 {i}"}, ensure_ascii=False) + "\n"
                            for i in range(3)))
    stream = data.PackedStream(data.Source("ko", str(path), flag="data_new"), base_tok, 0)
    stream.take(200)
    assert "warning: --data_new (" in capsys.readouterr().err  # read round again
    # under torchrun every rank says it of its own share, not rank 0 alone
    other = data.PackedStream(data.Source("ko", str(path), flag="data_new"), base_tok, 0,
                              rank=1, world_size=2)
    other.take(200)
    assert "(rank 1's share) is read to its end: going round again" in capsys.readouterr().err
    import prepare
    cfg = bori.Config(eval_new=str(path), eval_en=data.BUNDLED["en_eval"])
    evals, keys = prepare.eval_sets(bori.sources(cfg), eval_bytes=10_000, text_field="text")
    assert len(evals["ko"]) == 3 and set(map(data.text_key, evals["ko"])) < keys
    assert re.search(r"warning: --eval_new holds only \d+ of the 10,000 bytes asked for",
                     capsys.readouterr().err)


@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
def test_unequal_local_files_give_every_rank_an_equal_share(tmp_path, kind):
    """2 files of 1,200 and 2 documents on 2 ranks: sharded by file, rank 1 had the 2 and read
    them round and round. Every rank now keeps every other document of both files: shares
    of 601 and 601, disjoint, the whole source between them."""
    texts = [f"big {i}" for i in range(1200)]
    small = ["small 0", "small 1"]
    if kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq
        (tmp_path / "src").mkdir()
        pq.write_table(pa.table({"text": texts}), tmp_path / "src" / "a.parquet")
        pq.write_table(pa.table({"text": small}), tmp_path / "src" / "b.parquet")
        path = str(tmp_path / "src")
    else:
        path = str(write_source(tmp_path / "src", "jsonl", 1, texts))
        (tmp_path / "src" / "part-9.jsonl").write_text(
            "".join(json.dumps({"text": t}) + "\n" for t in small))
    src = data.Source("en", path)
    shares = [rank_texts(src, texts + small, r, 2, frozenset()) for r in range(2)]
    assert [len(s) for s in shares] == [601, 601]
    assert sorted(shares[0] + shares[1]) == sorted(texts + small)
