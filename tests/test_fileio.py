"""ldmcli.fileio: atomic writes (complete file or nothing under the final name) and file hashing."""

from __future__ import annotations

import hashlib
import os

import pytest

from ldmcli.fileio import atomic_path, atomic_write_bytes, atomic_write_text, sha256_file


def test_write_atomic_leaves_nothing_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "out.png"

    def broken_replace(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_bytes(target, b"data")
    assert list(tmp_path.iterdir()) == []


def test_atomic_path_keeps_previous_file_when_the_writer_fails(tmp_path):
    target = tmp_path / "sub" / "a.txt"
    assert atomic_write_text(target, "old") == target
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp.name.startswith(".a.txt.")
        tmp.write_text("half")
        raise RuntimeError
    assert target.read_text() == "old"
    assert [p.name for p in target.parent.iterdir()] == ["a.txt"]
    atomic_write_bytes(target, b"new", fsync=False)
    assert target.read_bytes() == b"new"
    assert [p.name for p in target.parent.iterdir()] == ["a.txt"]


def test_sha256_file_matches_hashlib_and_reports_progress(tmp_path):
    data = os.urandom((1 << 20) + 123)
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    seen = []
    assert sha256_file(path, lambda done, total, name: seen.append((done, total, name))) == \
        hashlib.sha256(data).hexdigest()
    assert seen == [(1 << 20, len(data), "blob.bin"), (len(data), len(data), "blob.bin")]
    assert sha256_file(str(path)) == hashlib.sha256(data).hexdigest()
