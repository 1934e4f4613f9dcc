"""readers.py: local corpus files that are not what they claim: other encodings, fields that are
not text, one huge line."""
import json
import re
import unicodedata

import pytest

import bori
import data
import readers
from errors import CorpusError
from helpers import one_error, tiny_flags


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-32"])
@pytest.mark.parametrize("language", ["ko", "en"])
def test_utf16_or_32_text_is_refused_naming_the_file(encoding, language, tmp_path, tiny_base,
                                                     capsys):
    text = {"ko": "한국어 문서입니다. 둘째 문장.", "en": "An English document."}[language]
    path = tmp_path / f"corpus.{encoding}.txt"
    path.write_bytes(("\n\n".join([text] * 50)).encode(encoding))
    out = tmp_path / "run"
    assert bori.main(tiny_flags(out, tiny_base, **{f"data_{language}": path})) == 2
    line = one_error(capsys)
    flag = {"ko": "data_new", "en": "data_en"}[language]
    assert f"--{flag}: {path} is not UTF-8 text (it looks like UTF-16 or UTF-32)" in line
    assert "iconv -f UTF-16 -t UTF-8" in line
    assert not (out / "config.json").exists()


@pytest.mark.parametrize("value, shown", [("12", "int '12'"), ("null", "NoneType 'None'"),
                                          ('["a", "b"]', "list \"['a', 'b']\"")])
def test_a_text_field_that_is_not_text_is_said(value, shown, tmp_path, base_tok):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "좋은 문서"}\n{"text": ' + value + "}\n")
    with pytest.raises(ValueError, match=re.escape(f"c.jsonl line 2: field 'text' holds {shown}, "
                                                   "not text; fix or drop that line")):
        data.PackedStream(data.Source("ko", str(path)), base_tok, 0).take(100)


@pytest.mark.slow
def test_one_huge_line_stays_bounded_and_round_trips(tmp_path, base_tok):
    """A 3 MB document on one line, .txt and .jsonl: pieces of at most 256 KiB, a token
    buffer far below the document's size, and the same text back."""
    doc = "".join(f"{i}번째 문장은 아주 길다. " for i in range(120_000))  # ~3.2 MB of UTF-8
    short = "짧은 문서."
    for name, content in [
            ("huge.txt", f"{doc}\n\n{short}\n"),
            ("huge.jsonl", "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n"
                                   for t in (doc, short)))]:
        (tmp_path / name).write_text(content)
        pieces = list(data.iter_pieces(str(tmp_path / name)))
        assert max(len(p.encode()) for p, _ in pieces) <= 2**18 + 3  # + a cut character
        assert "".join(p for p, _ in pieces[:-1]) == doc and pieces[-2][1] and pieces[-1][1]
        stream = data.PackedStream(data.Source("ko", str(tmp_path / name)), base_tok, 0)
        tokens, peak = [], 0
        while 0 not in tokens[-1000:]:  # up to the first document's EOS
            tokens += stream.take(1000)
            peak = max(peak, len(stream.state_dict()["buffer"]))
        first_doc = tokens[:tokens.index(0)]
        assert base_tok.decode(first_doc) == doc
        assert peak < 600_000 and len(first_doc) > 1_500_000, (peak, len(first_doc))


def test_what_check_readable_refuses_before_any_stage(tmp_path, capsys):
    """Each file of a source is opened and its first records read before the first stage: a
    parquet file without the text column, a JSON array, a file of blank lines; NFD text is read
    as it is, with a warning."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"content": ["한국어 문서"]}), tmp_path / "a.parquet")
    with pytest.raises(CorpusError, match=r"a.parquet has no text column 'text' \(it has "
                       r"\['content'\]\); name the column .* e.g. \S*a.parquet#content"):
        readers.check_readable(str(tmp_path / "a.parquet"), "text")
    readers.check_readable(str(tmp_path / "a.parquet"), "content")  # the named column is fine
    (tmp_path / "b.json").write_text('[\n  {"text": "한국어"},\n  {"text": "문서"}\n]\n')
    with pytest.raises(CorpusError, match=r"b.json is a JSON array, not JSON lines \(one object "
                       r"per line\); convert it, e.g. jq -c '.\[\]' "):
        readers.check_readable(str(tmp_path / "b.json"), "text")
    (tmp_path / "c.txt").write_text("\n" * 5000 + "   \n")
    with pytest.raises(CorpusError, match=r"c.txt holds no text \(only blank lines or spaces\)"):
        readers.check_readable(str(tmp_path / "c.txt"), "text")
    nfd = unicodedata.normalize("NFD", "한국어 문서입니다.\n")
    (tmp_path / "d.txt").write_text(nfd)
    readers.check_readable(str(tmp_path / "d.txt"), "text")
    assert "d.txt is not in Unicode NFC" in capsys.readouterr().err
    (tmp_path / "e.txt").write_text(unicodedata.normalize("NFC", nfd))
    readers.check_readable(str(tmp_path / "e.txt"), "text")
    assert "NFC" not in capsys.readouterr().err
