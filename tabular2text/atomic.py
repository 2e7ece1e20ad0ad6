"""Write a file or a directory so that readers see the old one or the complete new one, never a half.

Concurrency: several processes may write the same path at once (every DDP rank prepares the data; two runs
share a cache). Each writes its own temporary sibling; the step that puts one in place (checking what is
there, swapping) runs under an exclusive lock on `.<name>.lock`, so a writer never removes a result another
writer has just finished: an existing complete result is kept, and only a damaged or outdated one is
replaced. The lock is a `flock`, released by the kernel when its process ends, so it is never stale.

Errors: an `OSError` raised while writing names the path it is about (the target when the operating system
did not say), so the CLI can turn it into one line (`tabular2text.oserrors`).
"""

from __future__ import annotations

import errno
import fcntl
import glob
import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from tabular2text.oserrors import errno_of


def umask() -> int:
    """The process's umask, read without changing it where Linux shows it (os.umask can only set it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def usual_modes(root: Path) -> None:
    """Give `root` and everything under it the modes a plain `open`/`mkdir` would have given them: mkdtemp,
    mkstemp and some writers (safetensors: 0600) create private files a serving account could not read."""
    mask = umask()
    paths = [root, *root.rglob("*")] if root.is_dir() else [root]
    for p in paths:
        if not p.is_symlink():
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


def check_writable_place(path: Path, directory: bool) -> None:
    """Refuse, before anything is written, a target whose type is wrong or whose folder is under a file:
    renaming over it would replace the user's file with a folder (or the reverse)."""
    if directory and path.exists() and not path.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "is a file, not a folder", str(path))
    if not directory and path.is_dir():
        raise IsADirectoryError(errno.EISDIR, "is a folder, not a file", str(path))
    for parent in path.parents:  # the nearest existing ancestor must be a folder
        if parent.exists():
            if not parent.is_dir():
                raise NotADirectoryError(errno.ENOTDIR, "is a file, not a folder", str(parent))
            break


@contextmanager
def writer_lock(path: Path) -> Iterator[None]:
    """An exclusive lock among the writers of `path`: an flock on `.<name>.lock` beside it, removed by its
    holder on release (a waiter that then holds a removed file's lock tries again, so two never both hold it)."""
    lock = path.with_name(f".{path.name}.lock")
    while True:
        fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o666)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            if os.fstat(fd).st_ino == os.stat(lock).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)
        os.close(fd)  # releases the lock


@contextmanager
def naming(path: Path, tmp: Path | None = None) -> Iterator[None]:
    """An OSError of the block is raised again as the error about `path` when the operating system named no
    file (a write, a mapped page, pyarrow) or named the temporary sibling `tmp` (the user knows `path`, not its
    hidden sibling); any other error passes as it is."""
    try:
        yield
    except OSError as err:
        number = errno_of(err)
        named = err.filename is not None and not (tmp and str(err.filename).startswith(str(tmp)))
        if named or number is None:
            raise
        raise OSError(number, os.strerror(number), str(path)) from err  # OSError picks the subclass of the number


@contextmanager
def atomic_path(path: str | Path, *, directory: bool = False,
                replace: bool | Callable[[Path], bool] = True) -> Iterator[Path]:
    """A temporary sibling of `path` (an empty directory, or a file name not yet created) to fill in the
    block; when the block completes it becomes `path`, and on any error it is removed, `path` untouched.

    Args:
        path: the file or directory to write.
        directory: write a directory instead of a file.
        replace: whether an existing `path` is replaced (a directory by two renames, so `path` never holds a
            mix): True, False (keep it: another process finished the same work first; the new one is dropped)
            or a function of the existing path, asked under the writers' lock (True: replace it, e.g. because it
            is damaged; False: keep it, it is another writer's complete result).
    """
    path = Path(path)
    check_writable_place(path, directory)
    with naming(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_abandoned(path)
        prefix, suffix = f".{path.name}.{os.getpid()}-", ".tmp"
        if directory:
            tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=prefix, suffix=suffix))
        else:
            fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=prefix, suffix=suffix)
            os.close(fd)
            tmp = Path(tmp_name)
    old = tmp.with_name(tmp.name.removesuffix(suffix) + "-old" + suffix)  # a killed swap's leftover is abandoned
    try:
        with naming(path, tmp):
            yield tmp
            usual_modes(tmp)
            if not directory:
                os.replace(tmp, path)  # atomic: a concurrent writer's identical file is replaced, never missing
            else:
                with writer_lock(path):
                    exists = path.exists()
                    if exists and (replace(path) if callable(replace) else replace):
                        os.rename(path, old)
                        os.rename(tmp, path)
                    elif not exists:
                        os.rename(tmp, path)
                    # else: the existing one stands (another writer's complete result); ours is dropped
    finally:
        if directory:
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


def open_reserved_memmap(path: Path, dtype: np.dtype, shape: tuple[int, ...]) -> np.memmap:
    """A new .npy file opened as a writable memory map, with its disk space reserved first: a page of a map
    that the file system cannot back kills the process (SIGBUS) instead of raising, so a full disk must be
    found out here, as an OSError (ENOSPC)."""
    out = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)  # a sparse file
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    except OSError as err:
        if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # EOPNOTSUPP: no way to reserve; write through
            raise  # ENOSPC: atomic_path names the entry being written
    finally:
        os.close(fd)
    return out


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
