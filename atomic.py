"""Files that appear whole or not at all, and that can prove later that they are still whole.

Everything is written under `NAME.tmp`, flushed to disk (fsync), then renamed: a rename within
one file system is atomic, so a run killed at any moment leaves the old version or the new one.
A manifest (the sha256 of every file in a folder) catches what a rename cannot: a file cut
short or changed afterwards, by a full disk, a bad copy or a flipped bit.

    with atomic_dir(run / "init") as tmp: save_pretrained(model, tmp)   # whole, or absent
"""
import errno
import fcntl
import hashlib
import json
import os
import shutil
import socket
import threading
from contextlib import contextmanager
from pathlib import Path

MANIFEST = "manifest.json"  # never in its own digest; a checkpoint writes it last, as its proof


def fsync_dir(path: Path, files: bool = False):
    """Flush a folder entry (and its files) to disk, so that a rename after it is durable."""
    for f in sorted(path.iterdir()) if files else []:
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    # A rename changes the folder, not the file: only an fsync of the folder makes it survive a
    # power cut (POSIX fsync(2) on a directory descriptor).
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)


def tmp_path(dest: Path) -> Path:
    """dest's NAME.tmp sibling: in the same folder, hence the same file system, so renames work."""
    return dest.with_name(dest.name + ".tmp")


@contextmanager
def atomic_file(dest: Path):
    """Yield a temporary path to write dest's content to; it becomes dest if the block ends
    without an error and is removed if it raises."""
    dest = Path(dest)
    # a name of this writer's own: two writers of one file (report.py beside a run's last
    # stage) each replace dest whole, instead of renaming each other's half-written file
    tmp = dest.with_name(f"{dest.name}.{os.getpid()}-{threading.get_ident()}.tmp")
    try:
        yield tmp
        with open(tmp, "rb+") as f:  # data on disk before the rename, else a crash can leave
            os.fsync(f.fileno())  # dest renamed but empty
        os.replace(tmp, dest)  # atomic: a reader sees the old dest or the new one, never a mix
    except BaseException:  # a refused rename, Ctrl-C, SystemExit: no NAME.tmp is left behind
        tmp.unlink(missing_ok=True)
        raise


def write_text(dest: Path, text: str):
    """Replace dest's content with text, atomically."""
    with atomic_file(dest) as tmp:
        tmp.write_text(text)


def write_json(dest: Path, obj):
    """obj as indented JSON, atomically; Korean text stays readable (ensure_ascii=False)."""
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
    # rename(2) cannot replace a non-empty folder: a kill between these two lines leaves no dest,
    # and the caller redoes the work rather than reading half of it
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    fsync_dir(dest.parent)


@contextmanager
def atomic_dir(dest: Path, shared: bool = False):
    """Yield a temporary folder to fill; it becomes dest if the block ends without an error
    and is removed if it raises. shared: other processes may build the same dest at once (a
    cache); each builds its own, and the first to finish wins."""
    dest = Path(dest)
    # shared: a folder per process (NAME.PID.tmp), so two builders never write into one
    tmp = fresh_dir(dest.with_name(f"{dest.name}.{os.getpid()}") if shared else dest)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not shared:
        commit_dir(tmp, dest)
        return
    fsync_dir(tmp, files=True)
    try:  # no rmtree of dest here: another process may be reading the finished one
        tmp.rename(dest)
    except OSError:  # another process finished first: theirs stands
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def lock_dir(folder: Path):
    """Hold folder/.lock for the block: an advisory lock that the OS drops when this process
    ends, however it ends. A second holder is refused with one sentence naming the first."""
    f = open(Path(folder) / ".lock", "a+")  # "a+": no truncation before the lock is ours
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # NB: refuse now, not wait for hours
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise ValueError(f"{folder} is in use by another bori run ({holder}); wait for it to "
                         "end or stop it, or use another out_dir") from None
    f.seek(0)
    f.truncate()  # the lock is ours: the last holder's line goes
    f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    f.flush()  # a second run reads this line to name us
    try:
        yield
    finally:
        f.close()  # releases the lock; the stale line is harmless, the next holder rewrites it


def read_json(path: Path, hint: str):
    """A JSON state file, or one sentence naming it and what to do (hint)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:  # ValueError: cut short, edited, or not UTF-8
        reason = getattr(e, "strerror", None) or str(e).splitlines()[0]
        raise ValueError(f"{path} is unreadable ({reason}); {hint}") from None


@contextmanager
def disk_errors(what):
    """Turn a failed write into one sentence naming what could not be written, and the fix."""
    try:
        yield
    except OSError as e:
        reason = e.strerror or str(e).splitlines()[0]  # numpy: "N requested and M written"
        fix = ("choose a folder you may write to" if e.errno in (errno.EACCES, errno.EPERM,
                                                                 errno.EROFS)
               else "a file stands where a folder should (or the other way round): move it"
               if e.errno in (errno.EEXIST, errno.ENOTDIR, errno.EISDIR)
               else "check that the folder can exist there" if e.errno == errno.ENOENT
               else "free disk space (or set out_dir elsewhere)")
        raise OSError(f"could not write {what} ({reason}); {fix}, then run the same command "
                      "again") from None

# ----------------------------------------------------------------------------------------------
# Manifests: what a folder held when it was finished


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks: a ~0.5 GB fp32 model is never held whole."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def folder_digest(folder: Path) -> dict:
    """{relative path: {"bytes", "sha256"}} of every file below folder but its manifest."""
    return {p.relative_to(folder).as_posix(): {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST}


def damage(folder: Path, files: dict) -> str:
    """'' when every listed file is there with its size and sha256; else what is wrong."""
    for name, want in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != want["bytes"]:  # a cut file is named without hashing it
            return f"{name} has {path.stat().st_size:,} bytes, not {want['bytes']:,}"
        if sha256_file(path) != want["sha256"]:
            return f"{name} differs from what was written (checksum)"
    return ""
