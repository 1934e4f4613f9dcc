"""data.py: packing, rank sharding, exact resume, the mixture, file formats, held-out documents
and bad input."""
import gzip
import io
import json
import re

import pytest
import torch

import bori
import data
from data import Mixture, PackedStream, Source


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
    (b"", "empty.jsonl", "has no text for this rank"),
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


def test_a_source_that_is_also_eval_skips_the_held_out_documents(tmp_path, base_tok):
    texts = [f"문서 {i}: " + "가나다 " * (5 + i) for i in range(20)]
    path = tmp_path / "one.jsonl"
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts))
    held = data.eval_docs(str(path), 200)
    source = data.training_source(data.Corpus("ko", str(path), str(path), "data_new", "eval_new"),
                                  eval_bytes=200, text_field="text")
    assert source.skip == len(held) > 0
    stream = data.PackedStream(source, base_tok, 0)
    first = stream.take(5)
    assert first == base_tok.encode(texts[len(held)]).ids[:5]  # the first not held out
    other = data.Corpus("ko", str(path), "other.jsonl", "data_new", "eval_new")
    assert data.training_source(other, eval_bytes=200, text_field="text").skip == 0


def test_warnings_a_user_needs(tmp_path, base_tok, capsys):
    path = tmp_path / "small.jsonl"
    path.write_text("".join(json.dumps({"text": f"짧은 문서 {i}"}, ensure_ascii=False) + "\n"
                            for i in range(3)))
    stream = data.PackedStream(data.Source("ko", str(path), flag="data_new"), base_tok, 0)
    stream.take(200)
    assert "warning: --data_new (" in capsys.readouterr().err  # read round again
    import prepare
    cfg = bori.Config(eval_new=str(path), eval_en=str(path))
    prepare.eval_sets(bori.sources(cfg), eval_bytes=10_000, text_field="text")
    assert re.search(r"warning: --eval_new holds only \d+ of the 10,000 bytes asked for",
                     capsys.readouterr().err)
