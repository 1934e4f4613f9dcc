"""Local corpus files as documents: .txt, .jsonl/.json and .parquet, optionally gzipped.

A .txt file holds documents separated by blank lines; a .jsonl (or .json) file one JSON object
per line with the text under a field; parquet is read by `datasets`. A data path is a file, a
folder (every such file below it) or a glob. Memory stays bounded on any input: a document
longer than PIECE_BYTES comes in pieces (each example says whether it ends its document).
"""
import glob
import gzip
import json
import unicodedata
import zlib
from pathlib import Path

from errors import CorpusError, warn

LOCAL_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
PIECE_BYTES = 2**18  # 256 KiB of text at most per example
# UTF-16 LE, UTF-16 BE, UTF-32 BE; UTF-32 LE's mark (ff fe 00 00) starts like UTF-16 LE's
UTF16_32_BOMS = (b"\xff\xfe", b"\xfe\xff", b"\x00\x00\xfe\xff")


def file_kind(file: str) -> str:
    """.txt, .jsonl, .json or .parquet, through a .gz and other dots in the name."""
    return Path(file.removesuffix(".gz")).suffix


def local_files(spec: str) -> list:
    """The data files a path, folder or glob names, sorted; an error if there are none."""
    path = Path(spec).expanduser()
    found = ([str(path)] if path.is_file() else
             sorted(str(p) for p in path.rglob("*") if p.is_file()) if path.is_dir() else
             sorted(glob.glob(str(path), recursive=True)))  # sorted: the same order on every rank
    files = [f for f in found if file_kind(f) in LOCAL_SUFFIXES]
    if not files:
        what = "has no .txt/.jsonl/.json/.parquet files" if found else "matches no files"
        raise FileNotFoundError(f"data path {spec!r} {what}; pass a file, folder or glob of "
                                "text, or hf:NAME[:CONFIG[:SPLIT]] for a hub dataset")
    if any(f.endswith(".parquet.gz") for f in files):
        raise ValueError(f"data path {spec!r} holds gzipped parquet, which cannot be streamed; "
                         "gunzip it (parquet compresses its columns itself)")
    if len({file_kind(f) for f in files}) > 1:  # open_source picks one reader, by files[0]
        raise ValueError(f"data path {spec!r} mixes file types; give each type its own source")
    return files


def check_head(file: str, head: bytes):
    """Refuse text in another encoding: UTF-16 or UTF-32 (a byte-order mark, or NUL bytes,
    which UTF-8 text does not hold and UTF-16 holds in every other byte of ASCII), or one
    whose bytes are mostly not UTF-8 (CP949/EUC-KR, Shift-JIS...)."""
    convert = f"{file} > {Path(file).stem}.utf8{file_kind(file)}"
    if head.startswith(UTF16_32_BOMS) or head.count(0) > len(head) // 10:
        raise CorpusError(f"{file} is not UTF-8 text (it looks like UTF-16 or UTF-32); convert "
                          f"it, e.g. iconv -f UTF-16 -t UTF-8 {convert}")
    head = head[:whole_chars_length(head)]  # a character cut by the head's end is not a bad byte
    # a quarter: stray bad bytes pass (dropped and counted), another encoding does not
    if len(head) - len(head.decode("utf-8", errors="ignore").encode()) > len(head) // 4:
        raise CorpusError(f"{file} is not UTF-8 text (most of its first bytes are not UTF-8: "
                          f"another encoding, such as CP949); convert it, e.g. iconv -f CP949 "
                          f"-t UTF-8 {convert}")


def check_readable(spec: str, field: str):
    """Every local file of a data path opens and starts as UTF-8 text holding some text, a
    JSON-lines one with the text field in its first record, a parquet one with it among its
    columns (checked before a run writes anything; a file damaged further in is caught when it
    is reached). Text not in NFC is read as it is, with a warning."""
    for file in local_files(spec):
        if file_kind(file) == ".parquet":
            check_parquet_columns(file, field, spec)
            continue
        with open_text(file) as f:
            head = f.read(4096)  # the same 4 KiB that lines() checks when training reads it
            check_head(file, head)
            # a file of blank lines: read on only while it is blank, to its first text
            if not head.strip() and not any(chunk.strip() for chunk in iter(
                    lambda: f.read(2**20), b"")):
                raise CorpusError(f"{file} holds no text (only blank lines or spaces); fill it "
                                  "or leave it out of the data path")
            text = head[:whole_chars_length(head)].decode("utf-8", errors="ignore")
            if not unicodedata.is_normalized("NFC", text):
                warn(f"{file} is not in Unicode NFC (its Hangul or accents are decomposed, as "
                     "macOS writes file names); bori reads it as it is, and its tokens differ "
                     f"from NFC text's: normalise it, e.g. uconv -x any-nfc {file}")
            if file_kind(file) in (".json", ".jsonl"):
                f.seek(0)
                first = next((line for line in f if line.strip()), None)
                if first is not None:
                    # the UTF-8 byte-order mark, which some Windows editors write, goes first
                    line = decode(first.removeprefix(b"\xef\xbb\xbf"))[0]
                    if line.lstrip().startswith("["):
                        raise CorpusError(
                            f"{file} is a JSON array, not JSON lines (one object per line); "
                            f"convert it, e.g. jq -c '.[]' {file} > {Path(file).stem}.jsonl")
                    json_text(line, field, file, 1)


def check_parquet_columns(file: str, field: str, spec: str):
    """A parquet file's columns, read from its footer alone: the text field must be one."""
    import pyarrow.parquet as pq  # comes with datasets; only local parquet needs it here
    try:
        columns = pq.ParquetFile(file).schema_arrow.names
    except Exception as e:  # pyarrow's own error types: a cut or non-parquet file
        raise CorpusError(f"{file} is not a readable parquet file ({e}); download it again or "
                          "leave it out of the data path") from None
    if field not in columns:
        hint = f"{spec}#{columns[0]}" if columns else f"{spec}#KEY"
        raise CorpusError(f"{file} has no text column {field!r} (it has {sorted(columns)}); "
                          f"name the column that holds the text after the path, e.g. {hint}")


def open_text(file: str):
    """file opened as bytes (through gzip for .gz): bad UTF-8 is then counted, not fatal."""
    try:
        return gzip.open(file, "rb") if file.endswith(".gz") else open(file, "rb")
    except OSError as e:
        raise CorpusError(f"cannot read {file} ({e.strerror or e}); make sure it is there and "
                          "readable") from None


def whole_chars_length(chunk: bytes) -> int:
    """The length of chunk's longest start that does not end inside a UTF-8 character."""
    for back in range(1, min(4, len(chunk)) + 1):  # a UTF-8 character has at most 4 bytes
        byte = chunk[-back]
        if byte < 0x80:  # ASCII: a character ends here
            return len(chunk)
        if byte >= 0xC0:  # the lead byte of a character of `size` bytes
            size = 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4  # 110x, 1110x, 11110x
            return len(chunk) if back >= size else len(chunk) - back
    return len(chunk)


def lines(f, file: str):
    """(bytes, ends_line) pieces of a binary file: whole lines, and a line longer than
    PIECE_BYTES in pieces cut between characters."""
    carry = b""
    try:
        # readline with a limit: a file with no newline is never read whole into memory
        for n, chunk in enumerate(iter(lambda: f.readline(PIECE_BYTES), b"")):
            chunk = carry + chunk  # the start of a character the last piece cut off
            if n == 0:
                check_head(file, chunk[:4096])
                chunk = chunk.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark
            if chunk.endswith(b"\n"):
                carry = b""
                yield chunk, True
            else:
                cut = whole_chars_length(chunk)
                chunk, carry = chunk[:cut], chunk[cut:]
                yield chunk, False
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise CorpusError(f"{file} is a damaged or cut-short gzip file ({e}); download it again "
                          "or leave it out of the data path") from None
    if carry:
        yield carry, True


def read_local(files: list, text_field: str):
    """Documents of .txt (blank-line separated paragraphs) or JSON-lines files, as examples
    {text_field: text, "bad_bytes": invalid UTF-8 bytes dropped, "doc_end": last piece}."""
    for file in files:
        with open_text(file) as f:
            if file_kind(file) in (".json", ".jsonl"):
                yield from json_documents(f, file, text_field)
            else:
                yield from text_documents(f, file, text_field)


def decode(raw: bytes) -> tuple:
    """(text, how many invalid UTF-8 bytes were dropped)."""
    text = raw.decode("utf-8", errors="ignore")  # one bad byte drops itself, not the run
    return text, len(raw) - len(text.encode("utf-8"))


def text_documents(f, file: str, field: str):
    """Blank-line separated documents of a text file; a long one in pieces of ~PIECE_BYTES."""
    para, size = [], 0
    for raw, ends_line in lines(f, file):
        blank = ends_line and not raw.strip()
        if not blank:
            para.append(raw)
            size += len(raw)
        if size > PIECE_BYTES and len(para) > 1:  # a long paragraph: all but its last chunk
            text, bad = decode(b"".join(para[:-1]))
            yield {field: text, "bad_bytes": bad, "doc_end": False}
            para, size = para[-1:], len(para[-1])
        elif blank and para:
            text, bad = decode(b"".join(para))
            yield {field: text.rstrip("\n"), "bad_bytes": bad, "doc_end": True}
            para, size = [], 0
    if para:
        text, bad = decode(b"".join(para))
        yield {field: text.rstrip("\n"), "bad_bytes": bad, "doc_end": True}


def json_documents(f, file: str, field: str):
    """The text of each JSON line, in pieces of at most PIECE_BYTES."""
    line, n = [], 0
    for raw, ends_line in lines(f, file):
        line.append(raw)  # JSON parses only whole: a long line's pieces are joined first
        if not ends_line:
            continue
        n += 1
        text, bad = decode(b"".join(line))
        line = []
        if text.strip():
            text = json_text(text, field, file, n)
            step = PIECE_BYTES // 4  # characters: at most 4 bytes each
            for start in range(0, max(len(text), 1), step):
                # bad bytes are the line's: counted once, with its first piece
                yield {field: text[start:start + step], "bad_bytes": bad if start == 0 else 0,
                       "doc_end": start + step >= len(text)}


def json_text(line: str, field: str, file: str, n: int) -> str:
    """The text of one JSON-lines record (line n of file)."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise CorpusError(f"{file} line {n} is not valid JSON ({e.msg}); JSONL wants one object "
                          "per line") from None
    return field_text(obj, field, where=f"{file} line {n}", path=file, unit="line")


def field_text(record, field: str, where: str, path: str, unit: str = "record") -> str:
    """record[field] when record is a dict holding text there; else one sentence saying what
    the record holds and how to name the right key (PATH#KEY). where: the file and line, or
    the source; path: what the user passed; unit: what a record is there (a line, a record)."""
    if not isinstance(record, dict) or field not in record:
        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
        hint = f"e.g. {path}#{keys[0]}" if isinstance(keys, list) and keys else f"{path}#KEY"
        raise CorpusError(f"{where} has no text field {field!r} (it has {keys}); name the key "
                          f"that holds the text after the path, {hint}")
    if not isinstance(record[field], str):
        raise CorpusError(f"{where}: field {field!r} holds {type(record[field]).__name__} "
                          f"{str(record[field])[:40]!r}, not text; fix or drop that {unit}")
    return record[field]
