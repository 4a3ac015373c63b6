"""The model store: zoo entries fetched through LDM_MIRROR from a local server, offline errors, verification,
concurrent and killed downloads (real subprocesses)."""

from __future__ import annotations

import hashlib
import io
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from conftest import BERT_VOCAB, REPO
from httpserver import file_server, mirror  # noqa: F401  (fixtures)
from ldmcli import download, paths, store
from ldmcli.errors import DownloadError, LdmError, OfflineError

KL_F8 = "/files/latent-diffusion/kl-f8.zip"
CIN_V2 = "/files/latent-diffusion/nitro/cin/model.ckpt"
TXT2IMG = "/files/latent-diffusion/nitro/txt2img-f8-large/model.ckpt"
BERT = "/bert-base-uncased/resolve/main/vocab.txt"


def blob(n: int, seed: int) -> bytes:
    out = bytearray()
    block = hashlib.sha256(bytes([seed])).digest()
    while len(out) < n:
        block = hashlib.sha256(block).digest()
        out += block * 128
    return bytes(out[:n])


def make_zip(files: dict[str, bytes], extra: zipfile.ZipInfo | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
        if extra is not None:
            zf.writestr(extra, b"evil")
    return buf.getvalue()


def names_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_ensure_extracts_zip_records_manifest_and_is_idempotent(mirror):
    ckpt = blob(150_000, 1)
    mirror.add(KL_F8, make_zip({"model.ckpt": ckpt}))
    assert not store.is_complete("kl-f8")
    folder = store.ensure("kl-f8")
    assert folder == paths.first_stage_dir("kl-f8")
    assert store.checkpoint_path("kl-f8").read_bytes() == ckpt
    assert names_in(folder) == ["model.ckpt"]  # archive removed after extraction
    record = download.read_manifest()["files"]["models/first_stage_models/kl-f8/model.ckpt"]
    assert record["sha256"] == hashlib.sha256(ckpt).hexdigest() and record["size"] == len(ckpt)
    assert record["entry"] == "kl-f8" and record["url"] == mirror.url + KL_F8
    assert record["archive"]["name"] == "model.zip"
    store.ensure("kl-f8")
    store.checkpoint_path("kl-f8")
    assert len(mirror.gets(KL_F8)) == 1
    assert store.verify("kl-f8").ok


def test_assets_come_first_and_are_checksummed(mirror):
    vocab = BERT_VOCAB.read_bytes()
    mirror.add(BERT, vocab)
    mirror.add(TXT2IMG, blob(64_000, 2))
    path = store.checkpoint_path("txt2img-f8-large")
    assert path == paths.ldm_dir("text2img-large") / "model.ckpt"
    assert (store.asset_path("bert-base-uncased") / "vocab.txt").read_bytes() == vocab
    assert [r.path for r in mirror.log] == [BERT, TXT2IMG]


def test_asset_with_wrong_checksum_is_refused(mirror):
    mirror.add(BERT, b"[PAD]\n[UNK]\n")
    with pytest.raises(DownloadError, match="sha256 mismatch"):
        store.asset_path("bert-base-uncased")
    assert names_in(paths.assets_dir() / "bert-base-uncased") == []


def test_offline_error_names_missing_file_and_command(mirror, monkeypatch):
    monkeypatch.setenv("LDM_OFFLINE", "1")
    with pytest.raises(OfflineError) as e:
        store.checkpoint_path("kl-f8")
    msg = str(e.value)
    assert str(paths.first_stage_dir("kl-f8") / "model.ckpt") in msg and "ldm download kl-f8" in msg
    assert "\n" not in msg and mirror.log == []


def test_truncated_zip_leaves_nothing_and_next_call_refetches(mirror):
    good = make_zip({"model.ckpt": blob(200_000, 3)})
    mirror.add(KL_F8, good[: len(good) - 300])
    with pytest.raises(DownloadError, match="not a valid zip"):
        store.ensure("kl-f8")
    folder = paths.first_stage_dir("kl-f8")
    assert names_in(folder) == []
    assert names_in(folder.parent) == ["kl-f8"]  # no temporary extraction folder left
    mirror.add(KL_F8, good)
    store.ensure("kl-f8")
    assert names_in(folder) == ["model.ckpt"]


def test_zip_escaping_the_folder_is_rejected(mirror):
    mirror.add(KL_F8, make_zip({"model.ckpt": b"w"}, extra=zipfile.ZipInfo("../../ldm/evil.ckpt")))
    with pytest.raises(DownloadError, match="outside the target folder"):
        store.ensure("kl-f8")
    assert names_in(paths.first_stage_dir("kl-f8")) == []
    assert not (paths.models_dir() / "ldm").exists()
    assert download.read_manifest()["files"] == {}


def test_query_url_and_inpainting_last_ckpt(mirror):
    mirror.add("/f/4d9ac7ea40c64582b7c9/?dl=1", b"inpainting weights")
    assert store.checkpoint_path("inpainting_big") == paths.ldm_dir("inpainting_big") / "last.ckpt"
    assert (paths.ldm_dir("inpainting_big") / "last.ckpt").read_bytes() == b"inpainting weights"


def test_database_archive_extracts_into_shared_folder(mirror):
    from ldmcli import zoo

    files = {f"{db}/embeddings.npz": db.encode() for db in zoo.ARTBENCH_DATABASES}
    mirror.add("/files/rdm/artbench_databases.zip", make_zip(files))
    folder = store.ensure("artbench-databases")
    assert folder == paths.databases_dir()
    assert (folder / "artbench-baroque" / "embeddings.npz").read_bytes() == b"artbench-baroque"
    assert store.is_complete("artbench-databases") and not store.is_complete("openimages-database")
    report = store.verify("artbench-databases")
    assert report.ok and len(report.files) == 10
    with pytest.raises(LdmError, match="not a model"):
        store.checkpoint_path("artbench-databases")
    with pytest.raises(LdmError, match="not an asset"):
        store.asset_path("kl-f8")


def test_verify_reports_mismatch_missing_and_unrecorded(mirror):
    mirror.add(CIN_V2, blob(30_000, 4))
    path = store.checkpoint_path("cin256-v2")
    path.write_bytes(blob(30_000, 5))
    report = store.verify("cin256-v2")
    assert not report.ok and [f.status for f in report.files] == ["mismatch"]
    path.write_bytes(b"short")  # a size that differs from the manifest: no longer complete
    assert not store.is_complete("cin256-v2")
    path.unlink()
    assert [f.status for f in store.verify("cin256-v2").files] == ["missing"]
    placed = paths.first_stage_dir("vq-f4") / "model.ckpt"  # copied in by hand, never downloaded
    placed.parent.mkdir(parents=True)
    placed.write_bytes(b"by hand")
    assert store.is_complete("vq-f4")
    report = store.verify("vq-f4")
    assert report.ok and [f.status for f in report.files] == ["unrecorded"]


def test_force_downloads_again(mirror):
    mirror.add(CIN_V2, b"v1")
    store.ensure("cin256-v2")
    mirror.add(CIN_V2, b"v2!")
    assert store.checkpoint_path("cin256-v2").read_bytes() == b"v1"
    store.ensure("cin256-v2", force=True)
    assert store.checkpoint_path("cin256-v2").read_bytes() == b"v2!"
    assert download.read_manifest()["files"]["models/ldm/cin256-v2/model.ckpt"]["size"] == 3


# ------------------------------------------------------------------------------------- real processes


def _spawn(server, home: Path) -> subprocess.Popen:
    env = {**os.environ, "LDM_HOME": str(home), "LDM_MIRROR": server.url, "LDM_DOWNLOAD_BACKOFF": "0",
           "PYTHONPATH": str(REPO)}
    code = "from ldmcli import store; print(store.checkpoint_path('cin256-v2'))"
    return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _wait_for(predicate, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.01)


def test_killed_download_resumes_byte_identical(mirror, data_home):
    data = blob(3_000_000, 6)
    mirror.add(CIN_V2, data)
    mirror.throttle = 0.02  # ~1 s for the whole file: time to kill it halfway
    part = download.part_path(paths.ldm_dir("cin256-v2") / "model.ckpt")
    proc = _spawn(mirror, data_home)
    try:
        _wait_for(lambda: part.exists() and part.stat().st_size >= 500_000)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(10)
    assert proc.returncode == -signal.SIGKILL
    have = part.stat().st_size
    assert 0 < have < len(data)
    mirror.throttle = 0.0
    path = store.checkpoint_path("cin256-v2")
    assert mirror.gets(CIN_V2)[-1].range == f"bytes={have}-"
    assert path.read_bytes() == data and not part.exists()
    assert download.read_manifest()["files"]["models/ldm/cin256-v2/model.ckpt"]["sha256"] == \
        hashlib.sha256(data).hexdigest()


def test_two_concurrent_processes_produce_one_correct_file(mirror, data_home):
    data = blob(2_000_000, 7)
    mirror.add(CIN_V2, data)
    mirror.throttle = 0.01
    part = download.part_path(paths.ldm_dir("cin256-v2") / "model.ckpt")
    first = _spawn(mirror, data_home)
    try:
        _wait_for(lambda: part.exists())  # the first holds the lock and is mid-transfer
        second = _spawn(mirror, data_home)
        out = [p.communicate(timeout=60) for p in (first, second)]
    finally:
        for p in (first,):
            if p.poll() is None:
                p.kill()
    assert first.returncode == 0 and second.returncode == 0, out
    assert out[0][0] == out[1][0]
    assert (paths.ldm_dir("cin256-v2") / "model.ckpt").read_bytes() == data
    assert len(mirror.gets(CIN_V2)) == 1  # the second waited for the lock and found the file complete
    assert names_in(paths.ldm_dir("cin256-v2")) == ["model.ckpt"]


def test_offline_names_the_model_and_its_assets_at_once(mirror, monkeypatch):
    monkeypatch.setenv("LDM_OFFLINE", "1")
    vocab = paths.assets_dir() / "bert-base-uncased" / "vocab.txt"
    ckpt = paths.ldm_dir("text2img-large") / "model.ckpt"
    assert store.missing(["txt2img-f8-large"]) == {"bert-base-uncased": [vocab], "txt2img-f8-large": [ckpt]}
    for call in (lambda: store.require(["txt2img-f8-large", "kl-f8"]),
                 lambda: store.checkpoint_path("txt2img-f8-large")):
        with pytest.raises(OfflineError) as e:
            call()
        msg = str(e.value)
        assert str(vocab) in msg and str(ckpt) in msg and "\n" not in msg
    assert "ldm download txt2img-f8-large kl-f8" in str(
        pytest.raises(OfflineError, store.require, ["txt2img-f8-large", "kl-f8"]).value)
    assert mirror.log == []
    monkeypatch.delenv("LDM_OFFLINE")
    store.require(["txt2img-f8-large"])  # network allowed: nothing to refuse (the download happens on use)


def test_offline_require_passes_when_everything_is_there(mirror, monkeypatch):
    mirror.add(CIN_V2, b"weights")
    store.ensure("cin256-v2")
    monkeypatch.setenv("LDM_OFFLINE", "1")
    store.require(["cin256-v2", "digits"])
    assert store.missing(["cin256-v2"]) == {}


def test_builtin_model_needs_no_data_dir(tmp_path, monkeypatch, cli):
    afile = tmp_path / "home-is-a-file"
    afile.write_text("keep me")
    monkeypatch.setenv("LDM_HOME", str(afile))
    assert store.checkpoint_path("digits").is_file()
    store.require(["digits"])
    with pytest.raises(LdmError, match="is not a folder"):
        store.ensure("kl-f8")
    r = cli("sample", "digits", "--class", "3", "-n", "1", "-c", "2", "--outdir", str(tmp_path / "out"))
    assert r.exit_code == 0, r
    assert list((tmp_path / "out" / "samples").iterdir()) and afile.read_text() == "keep me"


def test_download_entries_reports_events_and_collects_failures(mirror):
    mirror.add(CIN_V2, b"weights")
    events = []
    summary = store.download_entries(["kl-f8", "cin256-v2"], on_event=events.append)
    assert [(e.kind, e.name) for e in events] == [("start", "kl-f8"), ("failed", "kl-f8"), ("start", "cin256-v2"),
                                                  ("done", "cin256-v2")]
    assert summary.done == ["cin256-v2"] and [n for n, _ in summary.failed] == ["kl-f8"]
    assert "404" in str(events[1].error) and "1 of 2 entries failed: kl-f8" in str(summary.error())
    summary = store.download_entries(["cin256-v2"])
    assert summary.skipped == ["cin256-v2"] and summary.error() is None
