"""The download engine against a real local HTTP server with injected faults, and the ``ldm download`` command."""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import zipfile
from pathlib import Path

import pytest

from httpserver import file_server, mirror  # noqa: F401  (fixtures)
from ldmcli import download, paths
from ldmcli.download import RetryPolicy
from ldmcli.errors import DownloadError, UsageError

FAST = RetryPolicy(attempts=3, backoff=0.0, connect_timeout=5, read_timeout=5)
ONCE = RetryPolicy(attempts=1, backoff=0.0, connect_timeout=5, read_timeout=5)


def payload(n: int, seed: int = 0) -> bytes:
    out = bytearray()
    block = hashlib.sha256(str(seed).encode()).digest()
    while len(out) < n:
        block = hashlib.sha256(block).digest()
        out += block * 64
    return bytes(out[:n])


def make_zip(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# ------------------------------------------------------------------------------------------------- fetch


def test_fetch_writes_file_records_sha256_and_reports_progress(file_server, tmp_path):
    data = payload(300_000)
    url = file_server.add("/f/a.bin", data)
    seen = []
    result = download.fetch(url, tmp_path / "a.bin", policy=FAST, progress=lambda d, t, n: seen.append((d, t, n)))
    assert (tmp_path / "a.bin").read_bytes() == data
    assert result.sha256 == hashlib.sha256(data).hexdigest() and result.size == len(data)
    assert seen[-1] == (len(data), len(data), "a.bin")
    assert not (tmp_path / "a.bin.part").exists()


def test_dropped_connection_leaves_partial_and_rerun_resumes_byte_identical(file_server, tmp_path):
    data = payload(500_000, seed=1)
    url = file_server.add("/f/b.bin", data)
    file_server.fault("/f/b.bin", "drop", after=200_000)
    target = tmp_path / "b.bin"
    with pytest.raises(DownloadError, match="rerun to resume"):
        download.fetch(url, target, policy=ONCE)
    assert not target.exists()
    assert (tmp_path / "b.bin.part").stat().st_size == 200_000
    result = download.fetch(url, target, policy=ONCE)
    assert file_server.gets("/f/b.bin")[-1].range == "bytes=200000-"
    assert target.read_bytes() == data
    assert result.resumed_from == 200_000 and result.sha256 == hashlib.sha256(data).hexdigest()


def test_dropped_connection_is_retried_with_range_in_the_same_call(file_server, tmp_path):
    data = payload(400_000, seed=2)
    url = file_server.add("/f/c.bin", data)
    file_server.fault("/f/c.bin", "drop", after=100_000)
    download.fetch(url, tmp_path / "c.bin", policy=FAST, sleep=lambda s: None)
    assert [r.range for r in file_server.gets("/f/c.bin")] == [None, "bytes=100000-"]
    assert (tmp_path / "c.bin").read_bytes() == data


def test_server_ignoring_range_restarts_from_zero(file_server, tmp_path):
    data = payload(200_000, seed=3)
    url = file_server.add("/f/d.bin", data)
    file_server.ignore_range.add("/f/d.bin")
    (tmp_path / "d.bin.part").write_bytes(b"x" * 50_000)  # a partial that must not be kept
    download.fetch(url, tmp_path / "d.bin", policy=FAST)
    assert file_server.gets("/f/d.bin")[0].range == "bytes=50000-"
    assert (tmp_path / "d.bin").read_bytes() == data


def test_500_then_200_is_retried_with_backoff(file_server, tmp_path):
    data = payload(10_000, seed=4)
    url = file_server.add("/f/e.bin", data)
    file_server.fault("/f/e.bin", "status", code=500)
    file_server.fault("/f/e.bin", "status", code=503)
    sleeps = []
    policy = RetryPolicy(attempts=4, backoff=0.5, factor=2.0, connect_timeout=5, read_timeout=5)
    download.fetch(url, tmp_path / "e.bin", policy=policy, sleep=sleeps.append)
    assert sleeps == [0.5, 1.0]
    assert len(file_server.gets("/f/e.bin")) == 3
    assert (tmp_path / "e.bin").read_bytes() == data


def test_persistent_5xx_gives_up_with_one_line_error(file_server, tmp_path):
    url = file_server.add("/f/f.bin", b"data")
    for _ in range(3):
        file_server.fault("/f/f.bin", "status", code=502)
    with pytest.raises(DownloadError) as e:
        download.fetch(url, tmp_path / "f.bin", policy=FAST, sleep=lambda s: None)
    assert "502" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "f.bin").exists()


def test_404_is_immediate_clear_error_and_nothing_is_written(file_server, tmp_path):
    url = file_server.url + "/missing.bin"
    with pytest.raises(DownloadError) as e:
        download.fetch(url, tmp_path / "m.bin", policy=FAST, sleep=lambda s: pytest.fail("4xx must not retry"))
    assert url in str(e.value) and "404" in str(e.value)
    assert leftovers(tmp_path) == []  # no .lock left behind either
    assert len(file_server.gets("/missing.bin")) == 1


def test_checksum_mismatch_deletes_partial(file_server, tmp_path):
    url = file_server.add("/f/g.bin", b"hello")
    with pytest.raises(DownloadError, match="md5 mismatch"):
        download.fetch(url, tmp_path / "g.bin", md5="0" * 32, policy=FAST)
    assert leftovers(tmp_path) == []
    r = download.fetch(url, tmp_path / "g.bin", md5=hashlib.md5(b"hello").hexdigest(),
                       sha256=hashlib.sha256(b"hello").hexdigest()[:8], policy=FAST)
    assert r.path.read_bytes() == b"hello"


def test_disk_space_is_checked_before_transfer(file_server, tmp_path, monkeypatch):
    url = file_server.add("/f/h.bin", payload(2_000_000))
    monkeypatch.setattr(download, "free_bytes", lambda path: 1_000_000)
    with pytest.raises(DownloadError) as e:
        download.fetch(url, tmp_path / "h.bin", policy=FAST)
    msg = str(e.value)
    assert "need 2.0 MB" in msg and "1.0 MB free" in msg
    assert leftovers(tmp_path) == []


def test_mirror_url_replaces_scheme_and_host_keeps_path_and_query(monkeypatch):
    url = "https://heibox.uni-heidelberg.de/f/4d9ac7ea40c64582b7c9/?dl=1"
    assert download.mirror_url(url) == url
    monkeypatch.setenv("LDM_MIRROR", "http://127.0.0.1:9/base/")
    assert download.mirror_url(url) == "http://127.0.0.1:9/base/f/4d9ac7ea40c64582b7c9/?dl=1"
    assert download.mirror_url("https://ommer-lab.com/files/latent-diffusion/kl-f8.zip", "https://m.example") == \
        "https://m.example/files/latent-diffusion/kl-f8.zip"
    monkeypatch.setenv("LDM_MIRROR", "ftp:/nope")
    with pytest.raises(UsageError):
        download.mirror_url(url)


def test_policy_from_environment(monkeypatch):
    monkeypatch.setenv("LDM_DOWNLOAD_RETRIES", "0")
    monkeypatch.setenv("LDM_DOWNLOAD_BACKOFF", "0.25")
    policy = download.default_policy()
    assert policy.attempts == 1 and policy.backoff == 0.25
    monkeypatch.setenv("LDM_DOWNLOAD_RETRIES", "many")
    with pytest.raises(UsageError):
        download.default_policy()


# ------------------------------------------------------------------------------------------------ archives


def test_extract_zip_places_files_and_hashes_them(tmp_path):
    archive = tmp_path / "ok.zip"
    archive.write_bytes(make_zip({"model.ckpt": b"weights", "sub/x.txt": b"x"}))
    dest = tmp_path / "dest"
    records = download.extract_zip(archive, dest, required=("model.ckpt",))
    assert (dest / "model.ckpt").read_bytes() == b"weights" and (dest / "sub" / "x.txt").read_bytes() == b"x"
    assert records["model.ckpt"] == {"sha256": hashlib.sha256(b"weights").hexdigest(), "size": 7}
    assert leftovers(tmp_path) == ["dest", "ok.zip"]


def _zip_with(info: zipfile.ZipInfo, data: bytes = b"evil") -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("model.ckpt", b"fine")
        zf.writestr(info, data)
    return buf.getvalue()


def _symlink_info() -> zipfile.ZipInfo:
    info = zipfile.ZipInfo("link")
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info


@pytest.mark.parametrize("bad", [
    zipfile.ZipInfo("../escape.txt"),
    zipfile.ZipInfo("a/../../escape.txt"),
    zipfile.ZipInfo("/abs.txt"),
    _symlink_info(),
])
def test_extract_zip_rejects_escaping_entries_and_leaves_nothing(tmp_path, bad):
    archive = tmp_path / "evil.zip"
    archive.write_bytes(_zip_with(bad, b"/etc/passwd"))
    dest = tmp_path / "a" / "dest"
    with pytest.raises(DownloadError, match="archive entry"):
        download.extract_zip(archive, dest)
    assert leftovers(dest) == [] and leftovers(tmp_path / "a") == ["dest"]
    assert not (tmp_path / "escape.txt").exists() and not (tmp_path / "a" / "escape.txt").exists()


def test_truncated_zip_is_rejected_and_leaves_nothing(tmp_path):
    data = make_zip({"model.ckpt": payload(100_000)})
    archive = tmp_path / "t.zip"
    archive.write_bytes(data[: len(data) // 2])
    with pytest.raises(DownloadError, match="not a valid zip"):
        download.extract_zip(archive, tmp_path / "dest")
    assert leftovers(tmp_path / "dest") == [] and leftovers(tmp_path) == ["dest", "t.zip"]


def test_zip_with_corrupt_member_is_rejected(tmp_path):
    data = bytearray(make_zip({"model.ckpt": payload(50_000)}))
    data[100] ^= 0xFF  # inside the compressed member: CRC/zlib failure while extracting
    archive = tmp_path / "c.zip"
    archive.write_bytes(bytes(data))
    with pytest.raises(DownloadError):
        download.extract_zip(archive, tmp_path / "dest")
    assert leftovers(tmp_path / "dest") == [] and leftovers(tmp_path) == ["c.zip", "dest"]


def test_zip_missing_required_content_is_rejected(tmp_path):
    archive = tmp_path / "w.zip"
    archive.write_bytes(make_zip({"other.ckpt": b"x"}))
    with pytest.raises(DownloadError, match=r"does not contain model.ckpt \(top level: other.ckpt\)"):
        download.extract_zip(archive, tmp_path / "dest", required=("model.ckpt",))
    assert leftovers(tmp_path / "dest") == []


def test_manifest_updates_merge_and_stay_valid_json():
    download.update_manifest({"a/x": {"sha256": "1", "size": 1}})
    download.update_manifest({"b/y": {"sha256": "2", "size": 2}})
    download.update_manifest(remove=["a/x"])
    data = json.loads((paths.data_dir() / "manifest.json").read_text())
    assert data["files"] == {"b/y": {"sha256": "2", "size": 2}}
    assert [p.name for p in paths.data_dir().iterdir() if p.name.startswith(".manifest")] == []


# ------------------------------------------------------------------------------------------------- the CLI


def serve_kl_f8(server, ckpt: bytes = b"kl-f8 weights") -> None:
    server.add("/files/latent-diffusion/kl-f8.zip", make_zip({"model.ckpt": ckpt}))


def test_cli_downloads_then_skips(cli, mirror):
    serve_kl_f8(mirror)
    r = cli("download", "kl-f8")
    assert r.exit_code == 0, r
    ckpt = paths.first_stage_dir("kl-f8") / "model.ckpt"
    assert ckpt.read_bytes() == b"kl-f8 weights"
    assert "kl-f8: downloaded model.zip" in r.stderr and "kl-f8: extracted model.zip" in r.stderr
    assert "resumed" not in r.stderr and r.stdout == ""
    r = cli("download", "kl-f8")
    assert r.exit_code == 0 and "already complete" in r.stderr
    assert len(mirror.gets("/files/latent-diffusion/kl-f8.zip")) == 1
    r = cli("download", "--force", "--quiet", "kl-f8")
    assert r.exit_code == 0 and r.stderr == ""
    assert len(mirror.gets("/files/latent-diffusion/kl-f8.zip")) == 2


def test_cli_unknown_name_is_usage_error_with_close_matches(cli, mirror):
    r = cli("download", "kl-f9")
    assert r.exit_code == 2, r
    assert r.stderr.strip().count("\n") == 0 and "kl-f8" in r.stderr
    assert mirror.log == []


def test_cli_404_is_one_line_failure(cli, mirror):
    r = cli("download", "kl-f8")
    assert r.exit_code == 1, r
    assert r.stderr.startswith("ldm: error:") and "404" in r.stderr and "kl-f8.zip" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (paths.first_stage_dir("kl-f8") / "model.ckpt").exists()


def test_cli_list_and_json(cli, mirror):
    serve_kl_f8(mirror)
    assert cli("download", "-q", "kl-f8").exit_code == 0
    r = cli("download", "--json")
    assert r.exit_code == 0, r
    rows = {row["name"]: row for row in json.loads(r.stdout)}
    assert len(rows) == 31 and rows["kl-f8"]["downloaded"] is True and rows["kl-f4"]["downloaded"] is False
    assert rows["txt2img-f8-large"]["size"] == 5_700_000_000 and rows["txt2img-f8-large"]["kind"] == "ldm"
    r = cli("download", "--list", "first-stages")
    assert r.exit_code == 0, r
    lines = [line for line in r.stdout.splitlines() if line.strip()]
    assert len(lines) == 10  # header + 9 first stages
    assert any(line.split()[:2] == ["kl-f8", "first"] and " yes " in line for line in lines)
    assert any(line.startswith("vq-f16") and " no " in line for line in lines)


def test_cli_verify_detects_corruption(cli, mirror):
    serve_kl_f8(mirror, b"original weights")
    assert cli("download", "-q", "kl-f8").exit_code == 0
    r = cli("download", "--verify")
    assert r.exit_code == 0 and "kl-f8: ok" in r.stderr, r
    (paths.first_stage_dir("kl-f8") / "model.ckpt").write_bytes(b"Original weights")  # same size, other bytes
    r = cli("download", "--verify", "kl-f8")
    assert r.exit_code == 1, r
    assert "MISMATCH" in r.stderr and "ldm download --force kl-f8" in r.stderr


def test_cli_option_conflicts_and_missing_names(cli):
    assert cli("download").exit_code == 2
    assert cli("download", "--verify", "--force", "kl-f8").exit_code == 2
    assert cli("download", "--list", "--force").exit_code == 2


def test_cli_offline_names_file_and_command(cli, mirror):
    r = cli("--offline", "download", "kl-f8")
    assert r.exit_code == 1, r
    assert "model.ckpt" in r.stderr and "ldm download kl-f8" in r.stderr
    assert mirror.log == []


def test_cli_start_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys; from ldmcli.cli import app; import ldmcli.commands.download; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert out.stdout.strip() == "False"


def test_ctrl_c_keeps_partial_and_next_call_resumes(cli, mirror, data_home):
    import signal
    import subprocess
    import sys
    import time

    data = payload(2_000_000, seed=9)
    mirror.add("/files/latent-diffusion/nitro/cin/model.ckpt", data)
    mirror.throttle = 0.02
    part = paths.ldm_dir("cin256-v2") / "model.ckpt.part"
    env = {**os.environ, "LDM_HOME": str(data_home), "LDM_MIRROR": mirror.url,
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-m", "ldmcli", "download", "cin256-v2"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while not (part.exists() and part.stat().st_size > 300_000):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.01)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "rerun the same command to resume" in err and "Traceback" not in err
    have = part.stat().st_size
    mirror.throttle = 0.0
    r = cli("download", "cin256-v2")
    assert r.exit_code == 0, r
    assert mirror.gets("/files/latent-diffusion/nitro/cin/model.ckpt")[-1].range == f"bytes={have}-"
    assert f"resumed at {download.human(have)}" in r.stderr
    assert (paths.ldm_dir("cin256-v2") / "model.ckpt").read_bytes() == data


def test_cli_disk_space_error_names_sizes(cli, mirror, monkeypatch):
    mirror.add("/files/latent-diffusion/nitro/cin/model.ckpt", payload(3_000_000, seed=10))
    monkeypatch.setattr(download, "free_bytes", lambda path: 2_000_000)
    r = cli("download", "cin256-v2")
    assert r.exit_code == 1, r
    assert len(r.stderr.strip().splitlines()) == 1
    assert "not enough disk space" in r.stderr and "need 3.0 MB, 2.0 MB free" in r.stderr
    assert not (paths.ldm_dir("cin256-v2") / "model.ckpt").exists()


def test_cli_offline_force_of_complete_entry_is_refused(cli, mirror):
    mirror.add("/files/latent-diffusion/nitro/cin/model.ckpt", b"weights")
    assert cli("download", "-q", "cin256-v2").exit_code == 0
    assert cli("--offline", "download", "cin256-v2").exit_code == 0  # complete: nothing to fetch
    r = cli("--offline", "download", "--force", "cin256-v2")
    assert r.exit_code == 1 and "network use is off" in r.stderr, r


def test_resume_of_a_file_that_changed_upstream_restarts_instead_of_splicing(file_server, tmp_path):
    old, new = payload(300_000, seed=11), payload(300_000, seed=12)
    url = file_server.add("/f/v.bin", old)
    file_server.fault("/f/v.bin", "drop", after=100_000)
    with pytest.raises(DownloadError):
        download.fetch(url, tmp_path / "v.bin", policy=ONCE)
    file_server.add("/f/v.bin", new)  # same size, new content, new ETag
    download.fetch(url, tmp_path / "v.bin", policy=ONCE)
    last = file_server.gets("/f/v.bin")[-1]
    assert last.range == "bytes=100000-"
    assert (tmp_path / "v.bin").read_bytes() == new
    assert leftovers(tmp_path) == ["v.bin"]


# ------------------------------------------------------------------------------ unreachable hosts, retries, locks


def _no_dns(monkeypatch):
    import socket

    calls = []

    def getaddrinfo(host, *args, **kwargs):
        calls.append(host)
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return calls


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once it is closed: connections are refused


def test_dns_failure_fails_at_once_with_one_line_naming_host_file_and_remedies(monkeypatch, tmp_path):
    import time

    calls = _no_dns(monkeypatch)
    url = "https://ommer-lab.com/files/latent-diffusion/kl-f8.zip"
    policy = RetryPolicy(attempts=6, backoff=1.0)  # the default: a transient error would take 31 s here
    started = time.monotonic()
    with pytest.raises(DownloadError) as e:
        download.fetch(url, tmp_path / "model.zip", policy=policy, notice=lambda n: pytest.fail("no retry"))
    assert time.monotonic() - started < 2.0
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < 250, msg
    assert "ommer-lab.com" in msg and "kl-f8.zip" in msg and "LDM_MIRROR" in msg and "--offline" in msg
    assert "does not resolve" in msg and "HTTPSConnectionPool" not in msg
    assert calls == ["ommer-lab.com"]
    assert leftovers(tmp_path) == []  # no .part, no .lock


def test_connection_refused_fails_at_once(tmp_path):
    import time

    url = f"http://127.0.0.1:{_closed_port()}/files/vocab.txt"
    started = time.monotonic()
    with pytest.raises(DownloadError) as e:
        download.fetch(url, tmp_path / "vocab.txt", policy=RetryPolicy(attempts=6, backoff=1.0))
    assert time.monotonic() - started < 2.0
    msg = str(e.value)
    assert "connection refused" in msg and url in msg and "LDM_MIRROR" in msg and "\n" not in msg
    assert leftovers(tmp_path) == []


def test_cli_offline_machine_fails_fast_with_one_line(cli, monkeypatch):
    import time

    _no_dns(monkeypatch)
    started = time.monotonic()
    r = cli("download", "kl-f8")
    assert time.monotonic() - started < 2.0
    assert r.exit_code == 1, r
    assert len(r.stderr.strip().splitlines()) == 1 and "ommer-lab.com" in r.stderr and "--offline" in r.stderr
    assert leftovers(paths.first_stage_dir("kl-f8")) == []


def test_retries_are_announced_with_their_delay_and_attempt(file_server, tmp_path):
    data = payload(50_000, seed=20)
    url = file_server.add("/f/r.bin", data)
    file_server.fault("/f/r.bin", "status", code=503)
    file_server.fault("/f/r.bin", "drop", after=20_000)
    heard, slept = [], []
    policy = RetryPolicy(attempts=3, backoff=0.5, connect_timeout=5, read_timeout=5)
    download.fetch(url, tmp_path / "r.bin", policy=policy, notice=heard.append, sleep=slept.append)
    assert (tmp_path / "r.bin").read_bytes() == data
    assert [n.kind for n in heard] == ["retry", "retry"] and slept == [0.5, 0.5]  # bytes moved: the count restarts
    assert str(heard[0]) == "r.bin: HTTP 503 Service Unavailable; retrying in 0.5 s (attempt 2 of 3)"
    assert str(heard[1]).startswith("r.bin: ") and "retrying at 20.0 kB in 0.5 s (attempt 2 of 3)" in str(heard[1])


def test_retries_variable_counts_retries_and_no_partial_is_claimed(file_server, tmp_path, monkeypatch):
    url = file_server.add("/f/p.bin", b"data")
    for _ in range(5):
        file_server.fault("/f/p.bin", "status", code=502)
    monkeypatch.setenv("LDM_DOWNLOAD_RETRIES", "2")
    monkeypatch.setenv("LDM_DOWNLOAD_BACKOFF", "0")
    with pytest.raises(DownloadError) as e:
        download.fetch(url, tmp_path / "p.bin")
    assert len(file_server.gets("/f/p.bin")) == 3  # the first attempt and 2 retries
    msg = str(e.value)
    assert "gave up after 3 attempt(s)" in msg and "kept in" not in msg and "rerun to try again" in msg
    assert leftovers(tmp_path) == []


def test_cli_shows_the_retry_on_stderr(cli, mirror, monkeypatch):
    serve_kl_f8(mirror)
    mirror.fault("/files/latent-diffusion/kl-f8.zip", "status", code=503)
    monkeypatch.setenv("LDM_DOWNLOAD_BACKOFF", "0")
    r = cli("download", "kl-f8")
    assert r.exit_code == 0, r
    assert "kl-f8: model.zip: HTTP 503 Service Unavailable; retrying in 0 s (attempt 2 of 6)" in r.stderr
    assert "kl-f8: complete" in r.stderr


def test_lock_file_is_removed_and_still_excludes_waiters(tmp_path):
    import threading
    import time

    lock = tmp_path / "x.lock"
    inside, most, heard = [0], [0], []
    guard = threading.Lock()

    def worker() -> None:
        for _ in range(20):
            with download.lock_file(lock, heard.append):
                with guard:
                    inside[0] += 1
                    most[0] = max(most[0], inside[0])
                time.sleep(0.0005)
                with guard:
                    inside[0] -= 1

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert most[0] == 1  # never two holders, although each release deletes the file others wait on
    assert not lock.exists()
    assert heard and all(n.kind == "waiting" and "another process" in str(n) for n in heard)


# ------------------------------------------------------------------------------------ groups, offline, data dir


def test_cli_group_goes_on_past_a_failed_entry_and_names_every_failure(cli, mirror):
    serve_kl_f8(mirror)  # kl-f4 and vq-f4 are not served: 404
    r = cli("download", "kl-f4", "kl-f8", "vq-f4")
    assert r.exit_code == 1, r
    assert (paths.first_stage_dir("kl-f8") / "model.ckpt").read_bytes() == b"kl-f8 weights"
    assert "kl-f8: complete" in r.stderr and "kl-f4: FAILED" in r.stderr and "vq-f4: FAILED" in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("ldm: error: 2 of 3 entries failed: kl-f4, vq-f4") and "404" in last
    assert "rerun 'ldm download kl-f4 vq-f4'" in last
    r = cli("download", "-q", "kl-f4", "kl-f8")
    assert r.exit_code == 1 and len(r.stderr.strip().splitlines()) == 1 and "kl-f4" in r.stderr, r


def test_cli_offline_names_every_missing_file_at_once(cli, mirror):
    r = cli("--offline", "download", "txt2img-f8-large")
    assert r.exit_code == 1, r
    assert len(r.stderr.strip().splitlines()) == 1
    assert str(paths.assets_dir() / "bert-base-uncased" / "vocab.txt") in r.stderr
    assert str(paths.ldm_dir("text2img-large") / "model.ckpt") in r.stderr
    assert "2 file(s) are missing" in r.stderr and mirror.log == []


@pytest.mark.parametrize("how", ["LDM_HOME", "--data-dir", "below a file"])
def test_data_dir_that_is_a_file_is_named_correctly(cli, tmp_path, monkeypatch, how):
    afile = tmp_path / "not-a-folder"
    afile.write_text("x")
    args = ("download", "kl-f8")
    if how == "--data-dir":
        args = ("--data-dir", str(afile), *args)
    else:
        monkeypatch.setenv("LDM_HOME", str(afile if how == "LDM_HOME" else afile / "sub"))
    r = cli(*args)
    assert r.exit_code == 2, r
    msg = r.stderr.strip()
    assert "\n" not in msg and "is not a folder" in msg and "delete it" not in msg
    assert ("--data-dir" if how == "--data-dir" else "LDM_HOME") in msg
    assert afile.read_text() == "x"
    r = cli("download", "--list") if how != "--data-dir" else cli("--data-dir", str(afile), "download", "--verify")
    assert r.exit_code == 2 and "is not a folder" in r.stderr, r


def test_giving_up_before_any_byte_leaves_no_empty_partial(file_server, tmp_path):
    url = file_server.add("/f/z.bin", payload(100_000, seed=21))
    for _ in range(2):
        file_server.fault("/f/z.bin", "drop", after=0)
    with pytest.raises(DownloadError) as e:
        download.fetch(url, tmp_path / "z.bin", policy=RetryPolicy(attempts=2, backoff=0.0), sleep=lambda s: None)
    assert "gave up after 2 attempt(s); rerun to try again" in str(e.value)
    assert leftovers(tmp_path) == []


def test_server_gone_in_the_middle_of_a_download_is_retried_then_keeps_the_partial(file_server, tmp_path):
    url = file_server.add("/f/w.bin", payload(200_000, seed=22))
    file_server.fault("/f/w.bin", "drop", after=50_000)
    slept = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        file_server.close()  # the next attempts are refused: a link that dropped, not a host that never answered

    with pytest.raises(DownloadError) as e:
        download.fetch(url, tmp_path / "w.bin", policy=RetryPolicy(attempts=3, backoff=0.0), sleep=sleep)
    assert len(slept) == 2 and "gave up after 3 attempt(s); 50.0 kB kept in w.bin.part" in str(e.value)
