"""Stored-number regression tests: every tiny model family's encode, decode, ``apply_model`` and 10-step DDIM outputs
against the numbers in ``tests/fixtures/regression.json`` (written by ``tests/make_regression.py``; its docstring says
what is stored and when to regenerate). The other tests check properties; these catch a consistent drift of the
arithmetic that keeps every property intact (a changed constant, a reordered normalisation, a different kernel).

Tolerance: atol 1e-5 + rtol 1e-4 per value, in float32 on one thread. Measured with torch 2.13.0 on an AVX-512 CPU
(numbers stored there), the same run with ``ATEN_CPU_CAPABILITY=avx2`` and ``=default`` (no SIMD kernels) stays within
7% of that tolerance (largest difference 9e-6, on DDIM outputs of size ~2-40), so no value needs a wider one. Scaling
the timestep embedding's period by 1% or the DDIM step's x0 term by 1e-4 fails every family.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from make_regression import ATOL, PATH, RTOL, compute, differences
from tinymodels import FAMILIES

STORED = json.loads(PATH.read_text())


def test_every_family_is_stored():
    assert list(STORED["families"]) == list(FAMILIES)
    for outputs in STORED["families"].values():
        assert sorted(outputs) == ["apply_model", "ddim10", "decode", "encode"]
        assert all(len(o["slice"]) == 8 and all(map(math.isfinite, o["slice"])) for o in outputs.values())


@pytest.mark.parametrize("family", FAMILIES)
def test_outputs_match_the_stored_numbers(family):
    actual = compute(family)
    diff = differences({family: STORED["families"][family]}, {family: actual})
    assert not diff, (
        f"tiny {family}: {len(diff)} stored numbers moved beyond atol {ATOL} + rtol {RTOL} (stored with torch "
        f"{STORED['torch']}, running {torch.__version__}):\n  " + "\n  ".join(diff)
        + f"\nnew values:\n{json.dumps(actual)}\nIf the change is intended, run `python tests/make_regression.py`."
    )


def test_differences_flag_what_moves_and_only_that():
    stored = {"f": {"decode": {"shape": [1, 3], "slice": [1.0, -2.0, 0.0], "mean": 0.5, "abs_mean": 1.0}}}
    same = json.loads(json.dumps(stored))
    same["f"]["decode"]["slice"] = [1.0 + 5e-5, -2.0 - 1e-4, 9e-6]  # within atol + rtol * |stored|
    assert differences(stored, same) == []

    moved = json.loads(json.dumps(stored))
    moved["f"]["decode"]["slice"][1] = -2.001
    moved["f"]["decode"]["abs_mean"] = float("nan")
    lines = differences(stored, moved)
    assert len(lines) == 2 and lines[0].startswith("f.decode.slice[1]: stored -2.0, got -2.001")
    assert lines[1].startswith("f.decode.abs_mean")

    reshaped = json.loads(json.dumps(stored))
    reshaped["f"]["decode"]["shape"] = [1, 4]
    assert differences(stored, reshaped) == ["f.decode: stored [1, 3], got [1, 4]"]
    assert differences(stored, {}) == ["f: not computed"]
    assert differences({}, stored) == ["f: not stored"]
