"""Write a file or a directory so that readers see the old one or the complete new one, never a half."""

from __future__ import annotations

import glob
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | Path, *, directory: bool = False, replace: bool = True) -> Iterator[Path]:
    """A temporary sibling of `path` (an empty directory, or a file name not yet created) to fill in the
    block; when the block completes it becomes `path`, and on any error it is removed, `path` untouched.

    Args:
        path: the file or directory to write.
        directory: write a directory instead of a file.
        replace: an existing `path` is replaced (a directory by two renames, so `path` never holds a mix);
            False keeps an existing one (another process finished the same work first) and drops the new one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned(path)
    prefix, suffix = f".{path.name}.{os.getpid()}-", ".tmp"
    if directory:
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=prefix, suffix=suffix))
    else:
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=prefix, suffix=suffix)
        os.close(fd)
        tmp = Path(name)
    old = path.with_name(f".{path.name}.old")
    try:
        yield tmp
        os.chmod(tmp, 0o755 if directory else 0o644)  # mkdtemp / mkstemp create private modes
        if not directory:
            os.replace(tmp, path)
        elif path.exists() and replace:
            shutil.rmtree(old, ignore_errors=True)
            os.rename(path, old)
            os.rename(tmp, path)
        elif not path.exists():
            try:
                os.rename(tmp, path)
            except OSError:
                if not path.exists():
                    raise  # else a concurrent writer finished first: its result stands
    finally:
        if directory:
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


def remove_abandoned(path: Path) -> None:
    """Remove the temporary siblings of `path` that a killed writer left: their name carries the writer's
    process id, and that process no longer runs on this machine."""
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*-*.tmp"):
        pid = tmp.name[len(path.name) + 2:].split("-", 1)[0]
        if pid.isdigit() and not process_alive(int(pid)):
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def first_mismatch(directory: Path, checksums: dict[str, str]) -> str | None:
    """The first file named in `checksums` that is missing from `directory` or differs from its sha256."""
    for name, digest in checksums.items():
        if not (directory / name).is_file() or file_sha256(directory / name) != digest:
            return name
    return None
