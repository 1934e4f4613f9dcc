"""Local corpus files as documents: .txt, .jsonl/.json and .parquet, optionally gzipped.

A .txt file holds documents separated by blank lines; a .jsonl (or .json) file one JSON object
per line with the text under a field; parquet is read by `datasets`. A data path is a file, a
folder (every such file below it) or a glob.
"""
import glob
import gzip
import json
from pathlib import Path

LOCAL_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")


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
