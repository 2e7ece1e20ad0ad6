"""Fetch MovieLens-100K when the data directory is absent.

First route: the GroupLens archive, checked against its published MD5. Where that host cannot be
reached, the fallback is the copy of ML-100K in RecBole atomic format inside the `recbole==1.2.1` wheel on
PyPI (fetched with `pip download --no-deps`, checked against the wheel's SHA-256). Both routes prepare
to the same 72,855 samples. The directory appears only when complete (extract to a temporary
directory, then rename).
"""

from __future__ import annotations

import hashlib
import io
import subprocess
import sys
import tempfile
import urllib.request
import zipfile
from pathlib import Path

from tabular2text.atomic import atomic_path

GROUPLENS_URL = "https://files.grouplens.org/datasets/movielens/ml-100k.zip"
GROUPLENS_MD5 = "0e33842e24a9c977be4e0107933c0723"
RECBOLE_WHEEL = "recbole==1.2.1"
RECBOLE_SHA256 = "9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407"
RECBOLE_MEMBER = "recbole/dataset_example/ml-100k/"


def from_grouplens(target: Path, timeout: float = 20.0) -> None:
    with urllib.request.urlopen(GROUPLENS_URL, timeout=timeout) as response:
        archive = response.read()
    if hashlib.md5(archive).hexdigest() != GROUPLENS_MD5:
        raise ValueError(f"{GROUPLENS_URL}: MD5 mismatch; the download is corrupt or the archive changed")
    with zipfile.ZipFile(io.BytesIO(archive)) as zf:
        for member in zf.namelist():
            name = Path(member).name
            if member.startswith("ml-100k/") and name.startswith("u.") and not member.endswith("/"):
                (target / name).write_bytes(zf.read(member))


def from_recbole_wheel(target: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp,
                        RECBOLE_WHEEL], check=True, capture_output=True)
        wheel = next(Path(tmp).glob("recbole-*.whl"))
        if hashlib.sha256(wheel.read_bytes()).hexdigest() != RECBOLE_SHA256:
            raise ValueError(f"{wheel.name}: SHA-256 mismatch; refusing to use it")
        with zipfile.ZipFile(wheel) as zf:
            for member in zf.namelist():
                if member.startswith(RECBOLE_MEMBER) and member.rsplit(".", 1)[-1] in ("inter", "user", "item"):
                    (target / Path(member).name).write_bytes(zf.read(member))


def ensure_movielens_100k(target: Path) -> Path:
    """Return `target`, downloading MovieLens-100K into it first when it does not exist."""
    target = Path(target)
    if target.exists():
        return target
    with atomic_path(target, directory=True, replace=False) as tmp:
        try:
            from_grouplens(tmp)
        except (OSError, ValueError) as e:
            print(f"GroupLens not reachable ({e}); using the ML-100K copy in the {RECBOLE_WHEEL} wheel",
                  file=sys.stderr)
            for leftover in tmp.iterdir():
                leftover.unlink()
            try:
                from_recbole_wheel(tmp)
            except (OSError, ValueError, subprocess.CalledProcessError, StopIteration) as e2:
                raise RuntimeError(f"could not download MovieLens-100K to {target}: GroupLens failed ({e}) and"
                                   f" the {RECBOLE_WHEEL} wheel failed ({e2}); copy the data there by hand") from e2
    return target
