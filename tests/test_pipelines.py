"""The pipelines from Python, with no CLI: typed requests in, typed events out, the same files as the commands."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from ldmcli.errors import RequestError, UsageError
from ldmcli.pipelines import events as ev
from ldmcli.pipelines import sample, txt2img
from ldmcli.sampling import SamplerSettings
from tinymodels import install_tiny

SETTINGS = dict(height=32, width=32, precision="fp32", device="cpu")


def test_txt2img_from_python_reports_typed_events_in_order(monkeypatch, tmp_path):
    install_tiny("txt2img", monkeypatch)
    seen: list[ev.Event] = []
    request = txt2img.Txt2ImgRequest(prompts=["a red cube"], model="tiny-txt2img", outdir=tmp_path / "out",
                                     settings=SamplerSettings("ddim", 3, 0.0, 5.0), n_samples=2, seed=4, **SETTINGS)
    result = txt2img.run(request, seen.append)
    kinds = [type(e).__name__ for e in seen]
    started = kinds.index("Started")
    assert "Message" in kinds[:started]  # loading is reported before sampling starts
    assert seen[started].steps_total == 3 and seen[started].images_total == 2 and seen[started].seed == 4
    steps = [e for e in seen if isinstance(e, ev.Step)]
    assert [e.steps_done for e in steps] == [1, 2, 3]
    written = [e.file for e in seen if isinstance(e, ev.FileWritten)]
    assert [f.kind for f in written] == ["sample", "sample", "grid"]
    assert written == result.files and result.images == 2 and result.seed == 4
    assert all(Path(f.path).is_file() for f in written)
    assert written[0].metadata["prompt"] == "a red cube" and written[1].metadata["seed"] == 5


def test_pipelines_import_no_cli_library():
    import subprocess

    code = ("import sys, ldmcli.pipelines.txt2img, ldmcli.pipelines.sample, ldmcli.pipelines.knn2img, "
            "ldmcli.pipelines.inpaint; bad = [m for m in ('typer', 'rich', 'click') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_request_errors_name_fields_and_fail_before_loading(monkeypatch, tmp_path):
    import ldmcli.loading

    install_tiny("cin", monkeypatch)
    monkeypatch.setattr(ldmcli.loading, "load", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(RequestError) as info:
        sample.run(sample.SampleRequest(model="tiny-cin", n_samples=0, outdir=tmp_path))
    assert info.value.field == "n_samples" and str(info.value) == "n_samples must be at least 1, got 0"
    assert info.value.for_option("--n_samples") == "--n_samples must be at least 1, got 0"
    with pytest.raises(RequestError) as info:
        sample.run(sample.SampleRequest(model="tiny-cin", classes=(99,), outdir=tmp_path))
    assert info.value.field == "classes" and "out of range" in str(info.value)
    with pytest.raises(UsageError, match="not a text-to-image model"):
        txt2img.check(txt2img.Txt2ImgRequest(prompts=["x"], model="tiny-cin"))


def test_class_model_with_a_null_class_samples_unconditionally(monkeypatch, tmp_path):
    """No class given to a model trained with --cond-drop: unconditional samples through its null class."""
    install_tiny("cin", monkeypatch)
    result = sample.run(sample.SampleRequest(model="tiny-cin", n_samples=2, outdir=tmp_path / "out", seed=0,
                                             settings=SamplerSettings("ddim", 2, 1.0, 1.0), precision="fp32",
                                             device="cpu"))
    samples = [f for f in result.files if f.kind == "sample"]
    assert len(samples) == 2 and all(f.metadata["class"] == 10 == f.metadata["null_class"] for f in samples)
    with pytest.raises(RequestError, match="no class given"):
        sample.check(sample.SampleRequest(model="tiny-cin", settings=SamplerSettings("ddim", 2, 1.0, 3.0)))
