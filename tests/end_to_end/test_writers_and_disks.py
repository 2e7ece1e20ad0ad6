"""Several writers of one cache, full and wrong file systems, and the modes of what is written.

Concurrent writers are real processes started together (as DDP ranks or two runs sharing a cache are); a full
disk is the operating system's ENOSPC, raised where the writers meet it (the test fakes it; a small tmpfs gives
the same line by hand).
"""

import errno
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import ROOT, write_generic

import tabular2text.prepare
from ctrl.app.cli import main
from tabular2text.atomic import atomic_path
from tabular2text.oserrors import forget_origins, origin, path_error
from tabular2text.prepare import damaged_file, prepare, read_split
from tabular2text.sources import DataError
from tabular2text.text_vectors import TextVectorCache

TEXTS = [f"text number {i}" for i in range(50)]

FAKE_ENCODER = """
import time
import numpy as np

class Encoder:  # deterministic vectors of each text; slow enough that writers overlap
    fingerprint, output_dim, dtype, precision, hidden_size = "fake", 8, np.dtype("float32"), "fp32", 8

    def encode_into(self, out, first, second=None, progress=True):
        time.sleep(0.3)
        for i, text in enumerate(first):
            out[i] = len(text) + np.arange(8)
"""


def expected_vectors() -> np.ndarray:
    return np.stack([len(t) + np.arange(8, dtype=np.float32) for t in sorted(TEXTS)])


def run_together(code: str, *args: str, n: int = 3) -> list[subprocess.CompletedProcess]:
    """`n` Python processes running `code` (sys.argv[1:] = args), released at the same instant."""
    start = str(time.time() + 4)  # past every process's imports
    wait = "import sys, time\nwhile time.time() < float(sys.argv[-1]):\n    time.sleep(0.001)\n"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    children = [subprocess.Popen([sys.executable, "-c", wait + textwrap.dedent(code), *args, start], env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(n)]
    return [subprocess.CompletedProcess(c.args, c.wait(timeout=120), *c.communicate()) for c in children]


PREPARE = """
from tabular2text.prepare import prepare, damaged_file, read_split
out = prepare(sys.argv[1], sys.argv[2])
assert damaged_file(out) is None, damaged_file(out)
for split in ("train", "val", "test"):
    read_split(out / f"{split}.parquet")  # the result this process was given is still there, whole
print(out)
"""


def test_concurrent_prepares_of_one_data_set_all_succeed_and_leave_one_whole_result(tmp_path):
    data = write_generic(tmp_path / "g")
    for attempt in range(3):
        cache = tmp_path / f"cache{attempt}"
        if attempt == 2:  # writers that all find a damaged result: one replaces it, none removes another's
            (result,) = {Path(p.stdout.strip()) for p in run_together(PREPARE, str(data), str(cache), n=1)}
            (result / "train.parquet").write_bytes(b"damaged")
        done = run_together(PREPARE, str(data), str(cache))
        assert [p.returncode for p in done] == [0, 0, 0], [p.stderr[-2000:] for p in done]
        (result,) = {Path(p.stdout.strip()) for p in done}
        assert damaged_file(result) is None
        assert [p.name for p in (cache / "prepared").iterdir()] == [result.name]  # no temporary, no lock left


BUILD = FAKE_ENCODER + """
from tabular2text.text_vectors import TextVectorCache
texts = sorted(f"text number {i}" for i in range(50))
vectors = TextVectorCache(sys.argv[1]).build(Encoder(), texts, pairs=False)
print(float(np.asarray(vectors).sum()))
"""


def test_a_prepared_split_removed_while_in_use_is_one_line_saying_to_run_again(tmp_path):
    """A run reads its splits when it needs them; one whose cache folder was deleted meanwhile (a user clearing the
    cache) says so and what to do, not Arrow's bare path."""
    out = prepare(str(write_generic(tmp_path / "g")), str(tmp_path / "cache"))
    (out / "val.parquet").unlink()
    with pytest.raises(DataError, match=r"^prepared split .*val\.parquet is gone: .*run the command again"):
        read_split(out / "val.parquet")


def test_concurrent_writers_of_one_text_vector_entry_all_succeed_and_leave_it_whole(tmp_path):
    for attempt in range(2):
        root = tmp_path / f"vectors{attempt}"
        done = run_together(BUILD, str(root))
        assert [p.returncode for p in done] == [0, 0, 0], [p.stderr[-2000:] for p in done]
        assert {float(p.stdout) for p in done} == {float(expected_vectors().sum())}
        (entry,) = root.iterdir()  # one entry, no temporary folder or lock beside it
        np.testing.assert_array_equal(np.load(entry / "vectors.npy"), expected_vectors())


def fake_encoder():
    scope = {}
    exec(FAKE_ENCODER, scope)
    return scope["Encoder"]()


def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_under_the_text_vector_cache_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    """The space of the mapped file is reserved before a page is written: a full disk is an ENOSPC error
    naming the entry and the option, not a SIGBUS; nothing is left behind, and a rerun with space succeeds."""
    forget_origins()
    root = origin(tmp_path / "tv", "--data.text_cache_dir")
    monkeypatch.setattr(os, "posix_fallocate", no_space)
    with pytest.raises(OSError) as raised:
        TextVectorCache(root).build(fake_encoder(), sorted(TEXTS), pairs=False)
    line = str(path_error(raised.value))
    assert line.startswith(f"{root}/") and "no space is left on its file system" in line
    assert f"(from --data.text_cache_dir {root})" in line and "free some space" in line
    assert list(root.iterdir()) == []
    monkeypatch.undo()
    np.testing.assert_array_equal(TextVectorCache(root).build(fake_encoder(), sorted(TEXTS), pairs=False),
                                  expected_vectors())


def test_a_full_disk_while_preparing_is_one_line_naming_the_cache_variable(tmp_path, monkeypatch, capsys):
    """pyarrow reports ENOSPC only in its message, with no file name: the atomic writer names its target."""
    def full(*args, **kwargs):
        raise OSError("Error writing bytes to file. Detail: [errno 28] No space left on device")

    monkeypatch.setenv("CTRL_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(tabular2text.prepare.pq, "write_table", full)
    with pytest.raises(SystemExit) as exit_info:
        main(["prepare", "--data_dir", str(write_generic(tmp_path / "g"))])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1
    assert err[0].startswith(f"error: {tmp_path}/cache/prepared/generic-") or "prepared/" in err[0]
    assert "no space is left on its file system" in err[0] and f"CTRL_CACHE_DIR={tmp_path}/cache" in err[0]
    assert list((tmp_path / "cache" / "prepared").iterdir()) == []


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_written_files_get_the_modes_of_the_umask_not_private_ones(tmp_path, mask):
    """A writer that creates private files (safetensors writes 0600) does not make an export unreadable to
    the account that serves it: the committed folder and its files take the umask's usual modes."""
    old = os.umask(mask)
    try:
        with atomic_path(tmp_path / "export", directory=True) as tmp:
            os.close(os.open(tmp / "weights.safetensors", os.O_CREAT | os.O_WRONLY, 0o600))
        with atomic_path(tmp_path / "scores.parquet") as tmp:
            tmp.write_bytes(b"x")
    finally:
        os.umask(old)
    assert (tmp_path / "export").stat().st_mode & 0o777 == 0o777 & ~mask
    assert (tmp_path / "export" / "weights.safetensors").stat().st_mode & 0o777 == 0o666 & ~mask
    assert (tmp_path / "scores.parquet").stat().st_mode & 0o777 == 0o666 & ~mask


def test_a_target_of_the_wrong_type_is_refused_and_left_as_it_was(tmp_path):
    (tmp_path / "export").write_text("my notes")
    with pytest.raises(NotADirectoryError), atomic_path(tmp_path / "export", directory=True):
        pytest.fail("the block must not run")
    (tmp_path / "scores").mkdir()
    with pytest.raises(IsADirectoryError), atomic_path(tmp_path / "scores"):
        pytest.fail("the block must not run")
    with pytest.raises(NotADirectoryError) as raised, atomic_path(tmp_path / "export" / "inner" / "x.json"):
        pytest.fail("the block must not run")
    assert raised.value.filename == str(tmp_path / "export")
    assert (tmp_path / "export").read_text() == "my notes" and list((tmp_path / "scores").iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "scores"]  # no hidden .old or .tmp


@pytest.mark.parametrize(("number", "what", "todo"), [
    (errno.EROFS, "its file system is read-only", "pass a writable folder"),
    (errno.EACCES, "permission denied", "change its permissions"),
    (errno.ENOSPC, "no space is left on its file system", "free some space"),
    (errno.EDQUOT, "the disk quota is used up", "free some space")])
def test_operating_system_errors_name_the_path_and_the_option_it_came_from(tmp_path, number, what, todo):
    """Read-only and permission errors cannot be made by a root test user portably; the mapping is the same
    for every cause, so it is checked here on the errors themselves."""
    forget_origins()
    origin(tmp_path / "runs", "--trainer.default_root_dir")
    origin(tmp_path / "runs" / "a" / "export", "--out")
    line = str(path_error(OSError(number, os.strerror(number), str(tmp_path / "runs" / "a" / ".fit.lock"))))
    assert line.startswith(f"{tmp_path}/runs/a/.fit.lock: {what} (from --trainer.default_root_dir {tmp_path}/runs); ")
    assert line.endswith(todo) or todo in line.split("; ", 1)[1]
    assert "(from --out " in str(path_error(OSError(number, "x", str(tmp_path / "runs" / "a" / "export" / "f"))))
    assert path_error(OSError(errno.EIO, "x", str(tmp_path))) is None  # not a user-side cause: the catch-all
    assert path_error(ValueError("x")) is None
