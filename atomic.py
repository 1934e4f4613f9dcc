"""Atomic writes: a file or a folder appears whole under its name, or not at all.

Everything is written under `NAME.tmp`, flushed to disk (fsync), then renamed: a rename within
one file system is atomic, so a run killed at any moment leaves the old version or the new one.
"""
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path


def fsync_dir(path: Path, files: bool = False):
    """Flush a folder entry (and its files) to disk, so that a rename after it is durable."""
    for f in sorted(path.iterdir()) if files else []:
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)


def tmp_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".tmp")


@contextmanager
def atomic_file(dest: Path):
    """Yield a temporary path to write dest's content to; it becomes dest if the block ends
    without an error and is removed if it raises."""
    dest = Path(dest)
    tmp = tmp_path(dest)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, dest)


def write_text(dest: Path, text: str):
    with atomic_file(dest) as tmp:
        tmp.write_text(text)


def write_json(dest: Path, obj):
    write_text(dest, json.dumps(obj, indent=2, ensure_ascii=False))


def fresh_dir(dest: Path) -> Path:
    """An empty temporary folder beside dest (one a killed run left behind is cleared)."""
    tmp = tmp_path(dest)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def commit_dir(tmp: Path, dest: Path):
    """Flush tmp's files, then put it in dest's place (an old dest is removed first)."""
    fsync_dir(tmp, files=True)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    fsync_dir(dest.parent)


@contextmanager
def atomic_dir(dest: Path):
    """Yield a temporary folder to fill; it becomes dest if the block ends without an error
    and is removed if it raises."""
    dest = Path(dest)
    tmp = fresh_dir(dest)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    commit_dir(tmp, dest)
