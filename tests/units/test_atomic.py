"""atomic_path: readers see the old file or directory or the complete new one; a failed write leaves nothing."""

import pytest

from tabular2text.atomic import atomic_path


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_a_file_appears_complete_or_not_at_all(tmp_path):
    path = tmp_path / "sub" / "out.txt"
    with atomic_path(path) as tmp:
        tmp.write_text("one")
        assert not path.exists()
    assert path.read_text() == "one"
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert path.read_text() == "one" and leftovers(path.parent) == []


def test_a_directory_is_replaced_only_by_a_complete_one(tmp_path):
    path = tmp_path / "export"
    for content in ("old", "new"):
        with atomic_path(path, directory=True) as tmp:
            (tmp / "a").write_text(content)
    assert (path / "a").read_text() == "new" and (path.stat().st_mode & 0o777) == 0o755
    with pytest.raises(RuntimeError), atomic_path(path, directory=True) as tmp:
        (tmp / "a").write_text("half")
        raise RuntimeError("killed")
    assert (path / "a").read_text() == "new" and leftovers(tmp_path) == []


def test_replace_false_keeps_what_a_concurrent_writer_finished_first(tmp_path):
    path = tmp_path / "prepared"
    with atomic_path(path, directory=True, replace=False) as tmp:
        (tmp / "a").write_text("mine")
        path.mkdir()
        (path / "a").write_text("theirs")  # another process finished while this one worked
    assert (path / "a").read_text() == "theirs" and leftovers(tmp_path) == []
