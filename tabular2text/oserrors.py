"""The operating system's errors about a user's paths, as one line that names the path, the option or variable
it came from, and what to do.

Whoever resolves a path from an option registers it (`origin`); the CLI's error boundary asks `path_error` about
any error, and for an OSError of a user-side cause (no space, read-only, not a folder, a folder, permission, no
such file) gets the line, with the option whose folder holds the path. Other errors give None.
"""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path

ORIGINS: dict[Path, str] = {}  # an absolute folder or file -> the option or variable that gave it


class PathError(OSError):
    """A user's path that cannot be used; the message is the whole line."""

    def __str__(self) -> str:
        return self.args[0]


def origin(path: str | Path, option: str) -> Path:
    """Remember that `path` (and everything under it) came from `option`; returns `path`."""
    ORIGINS[Path(os.path.abspath(Path(path).expanduser()))] = option
    return Path(path)


def forget_origins() -> None:
    ORIGINS.clear()


def option_of(path: Path) -> str | None:
    """`option ROOT` of the registered folder nearest to `path`, or None."""
    roots = [root for root in ORIGINS if root == path or root in path.parents]
    if not roots:
        return None
    root = max(roots, key=lambda r: len(r.parts))
    option = ORIGINS[root]
    return f"{option}={root}" if option.isupper() else f"{option} {root}"  # an environment variable: NAME=VALUE


def errno_of(err: OSError) -> int | None:
    """The error number, also when a library (pyarrow) only writes it into the message."""
    if err.errno is not None:
        return err.errno
    found = re.search(r"\[errno (\d+)\]", str(err), re.IGNORECASE)
    return int(found.group(1)) if found else None


def first_file_above(path: Path) -> Path:
    """The nearest of `path` and its parents that exists as something other than a folder (or `path`)."""
    for p in (path, *path.parents):
        if p.exists():
            return p if not p.is_dir() else path
    return path


CAUSES = {  # errno -> (what is wrong, what to do)
    errno.ENOSPC: ("no space is left on its file system", "free some space or pass a folder on another file system"),
    errno.EDQUOT: ("the disk quota is used up", "free some space or pass a folder on another file system"),
    errno.EROFS: ("its file system is read-only", "pass a writable folder"),
    errno.ENOTDIR: ("is a file, not a folder", "pass a folder, or move the file away"),
    errno.EEXIST: ("is a file, not a folder", "pass a folder, or move the file away"),
    errno.EISDIR: ("is a folder, not a file", "pass a file name"),
    errno.EACCES: ("permission denied", "pass a path you may read and write, or change its permissions"),
    errno.EPERM: ("permission denied", "pass a path you may read and write, or change its permissions"),
    errno.ENOENT: ("does not exist", "pass an existing path"),
}


def path_error(err: BaseException) -> PathError | None:
    """The one-line error of an OSError of a user-side cause that names its path; else None."""
    if not isinstance(err, OSError) or isinstance(err, PathError) or not err.filename:
        return None
    number = errno_of(err)
    if number not in CAUSES:
        return None
    path = Path(os.path.abspath(os.fsdecode(err.filename)))
    what, todo = CAUSES[number]
    if number in (errno.ENOTDIR, errno.EEXIST):
        path = first_file_above(path)
        if number == errno.EEXIST and (path.is_dir() or not path.exists()):
            return None  # an ordinary "exists": not a user-side cause this module knows
    option = option_of(path)
    where = f" (from {option})" if option else ""
    return PathError(f"{path}: {what}{where}; {todo}")
