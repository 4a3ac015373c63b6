"""Shared fixtures: every test gets its own data directory and drives the real typer app through a runner."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tiny models are dominated by per-op overhead: one thread is as fast as two on a quiet machine and 20-50x faster on a
# loaded one (thread oversubscription). Subprocesses (torchrun, killed trainings) inherit it through the environment.
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]
# Everything the tests read lives in the repository (tests/fixtures/README.md says what each file is and its source):
FIXTURES = REPO / "tests" / "fixtures"
REFERENCE = FIXTURES  # upstream configs (``configs/``, by upstream relative path) and state_dict manifests
BERT_VOCAB = FIXTURES / "bert-base-uncased-vocab.txt"


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def data_home(tmp_path_factory, monkeypatch) -> Path:
    """A fresh data directory (``LDM_HOME``) per test, never the user's; network-forbidding variables cleared."""
    home = tmp_path_factory.mktemp("ldm_home")
    monkeypatch.setenv("LDM_HOME", str(home))
    for var in ("LDM_OFFLINE", "LDM_MIRROR", "LDM_DEBUG"):
        monkeypatch.delenv(var, raising=False)
    from ldmcli import paths

    paths.set_data_dir(None)
    paths.set_offline(False)
    return home


class CliResult:
    def __init__(self, result):
        self.exit_code = result.exit_code
        self.stdout = result.stdout
        self.stderr = result.stderr
        self.exception = result.exception

    def __repr__(self) -> str:
        return f"<CliResult exit={self.exit_code} stdout={self.stdout[-2000:]!r} stderr={self.stderr[-2000:]!r}>"


@pytest.fixture
def cli():
    """``cli("download", "--list")`` runs the real app in-process and returns exit code, stdout and stderr."""
    from typer.testing import CliRunner

    from ldmcli.cli import app

    def run(*args: str, input: str | None = None, env: dict | None = None) -> CliResult:
        runner = CliRunner()
        return CliResult(runner.invoke(app, [str(a) for a in args], input=input, env=env, catch_exceptions=True))

    return run
