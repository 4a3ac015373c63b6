"""Write ``tests/fixtures/regression.json``: stored output numbers of every tiny model family (``test_regression.py``).

For each family of :mod:`tinymodels` (KL and VQ first stages; unconditional, class-conditional, text/BERT
cross-attention, CLIP-sized cross-attention and concat-conditioned LDMs), built from its fixed seed in float32 on one
CPU thread, it records a few numbers of each of

* ``encode``      ``get_first_stage_encoding(encode_first_stage(x))`` of seeded images (KL: a seeded posterior sample),
* ``decode``      ``decode_first_stage(z)`` of seeded latents (VQ: quantised first),
* ``apply_model`` the UNet's output for seeded noisy latents at two timesteps with the family's conditioning,
* ``ddim10``      a 10-step DDIM run (eta 0; classifier-free guidance for the text and class families) with the EMA
                  weights, from seeded noise,

namely the shape, 8 values at fixed evenly spaced positions of the flattened output, its mean and its mean absolute
value (as diffusers' pipeline tests pin an output slice). A drift in any arithmetic on those paths changes them.

The numbers are a record, not a specification: regenerate them only when a change of numbers is the point (a fixed
bug, a deliberate change of arithmetic or of the tiny models), after reading the new values the failing test prints,
and say why in the commit message::

    PYTHONPATH=$PWD python tests/make_regression.py          # from the repository root; rewrites the file
    PYTHONPATH=$PWD python tests/make_regression.py --check  # compare only (what the test does), print differences
    PYTHONPATH=$PWD python tests/make_regression.py --only semantic layout   # add new families, keep the others
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tinymodels import FAMILIES, build_tiny  # noqa: E402

PATH = Path(__file__).resolve().parent / "fixtures" / "regression.json"
#: how many values of the flattened output are stored (at evenly spaced positions, first and last included)
SLICE = 8
#: float32 on one thread: a change of kernel (e.g. AVX2 instead of AVX-512, see test_regression.py) moves the last
#: bits, 10 DDIM steps through a UNet amplify them to ~1e-6; a change of arithmetic moves them by far more
ATOL, RTOL = 1e-5, 1e-4
SEED = 1234
PROMPTS = ["a red bicycle", "a lighthouse at night"]
CLASSES = [3, 7]
NULL_CLASS = 10  # the tiny cin family has 11 classes, the last one null (as cin256-v2)
LAYOUTS = [{"class": "Dog", "bbox": [0.1, 0.2, 0.5, 0.6]}, {"class": "Tree", "bbox": [0.6, 0.0, 0.4, 0.9],
                                                            "group_of": True}]


def summary(t: torch.Tensor) -> dict:
    """Shape, ``SLICE`` values at fixed positions of the flattened tensor, mean and mean absolute value."""
    flat = t.detach().double().flatten()
    index = torch.linspace(0, flat.numel() - 1, SLICE).round().long()
    return {
        "shape": list(t.shape),
        "slice": [float(v) for v in flat[index]],
        "mean": float(flat.mean()),
        "abs_mean": float(flat.abs().mean()),
    }


def _conditioning(family: str, model: torch.nn.Module, g: torch.Generator) -> tuple[object, object, float]:
    """``(cond, uncond, guidance scale)`` for a batch of two, the way each family is sampled."""
    if family == "txt2img":
        return model.get_learned_conditioning(PROMPTS), model.get_learned_conditioning([""] * 2), 5.0
    if family == "cin":
        labels = {"class_label": torch.tensor(CLASSES)}
        null = {"class_label": torch.tensor([NULL_CLASS] * 2)}
        return model.get_learned_conditioning(labels), model.get_learned_conditioning(null), 3.0
    if family in ("uncond", "churches"):
        return None, None, 1.0
    if family == "inpaint":  # the first-stage encoding of the masked image plus the mask at latent size
        image = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
        mask = torch.zeros(2, 1, 32, 32)
        mask[0, :, 8:20, 4:28] = 1
        mask[1, :, 16:32, 0:12] = 1
        masked = (1 - mask) * image
        c = model.get_learned_conditioning(masked)
        return torch.cat([c, F.interpolate(mask * 2 - 1, size=c.shape[-2:])], dim=1), None, 1.0
    if family == "sr":  # the low-resolution image itself, at latent size
        return torch.rand(2, 3, 8, 8, generator=g) * 2 - 1, None, 1.0
    if family == "rdm":  # unit-norm CLIP-like embeddings of 4 retrieved neighbours
        context = torch.randn(2, 4, 64, generator=g)
        return context / context.norm(dim=-1, keepdim=True), None, 1.0
    if family == "semantic":  # one-hot COCO-Stuff label maps through the SpatialRescaler
        from ldmcli.conditioning.segmentation import one_hot

        ids = torch.randint(0, 182, (2, 32, 32), generator=g)
        return model.get_learned_conditioning(one_hot(ids)), None, 1.0
    if family == "layout":  # two layouts as taming's bounding-box tokens through the BERTEmbedder
        from ldmcli.conditioning.layout import layout_tokens

        tokens = torch.stack([layout_tokens(LAYOUTS[:1]), layout_tokens(LAYOUTS)])
        return model.get_learned_conditioning(tokens), None, 1.0
    raise ValueError(f"no conditioning recipe for tiny family {family!r}")


def compute(family: str) -> dict:
    """The stored numbers of one tiny family (see the module docstring)."""
    with torch.random.fork_rng(devices=[]):  # should anything draw from the global stream, it is the same each time
        torch.manual_seed(0)
        return _compute(family)


@torch.no_grad()
def _compute(family: str) -> dict:
    from ldmcli.sampling import DiscreteSchedule, classifier_free_guidance, ddim_timesteps, sample_ddim

    with tempfile.TemporaryDirectory() as folder:
        model = build_tiny(family, folder).float().eval()
    g = torch.Generator().manual_seed(SEED)
    channels, size = model.channels, model.image_size
    images = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    z = model.get_first_stage_encoding(model.encode_first_stage(images), generator=g)
    latents = torch.randn(2, channels, size, size, generator=g)
    decoded = model.decode_first_stage(latents)
    cond, uncond, scale = _conditioning(family, model, g)
    noisy = torch.randn(2, channels, size, size, generator=g)
    eps = model.apply_model(noisy, torch.tensor([37, 700]), cond)
    x_T = torch.randn(2, channels, size, size, generator=g)
    with model.ema_scope():
        denoise = classifier_free_guidance(model.apply_model, cond, uncond, scale)
        schedule = DiscreteSchedule.from_model(model)
        sample = sample_ddim(denoise, x_T, schedule, ddim_timesteps(10, schedule.num_timesteps))
    return {"encode": summary(z), "decode": summary(decoded), "apply_model": summary(eps), "ddim10": summary(sample)}


def compute_all() -> dict:
    torch.set_num_threads(1)
    return {family: compute(family) for family in FAMILIES}


def differences(expected: dict, actual: dict, atol: float = ATOL, rtol: float = RTOL) -> list[str]:
    """One line per stored number outside ``atol + rtol * |expected|`` (or shape/key mismatch); empty when all agree."""
    out = []
    for family in sorted(set(expected) | set(actual)):
        if family not in expected or family not in actual:
            out.append(f"{family}: {'not stored' if family not in expected else 'not computed'}")
            continue
        for output in sorted(set(expected[family]) | set(actual[family])):
            e, a = expected[family].get(output), actual[family].get(output)
            if e is None or a is None or e["shape"] != a["shape"]:
                out.append(f"{family}.{output}: stored {e and e['shape']}, got {a and a['shape']}")
                continue
            pairs = [(f"slice[{i}]", x, y) for i, (x, y) in enumerate(zip(e["slice"], a["slice"]))]
            pairs += [("mean", e["mean"], a["mean"]), ("abs_mean", e["abs_mean"], a["abs_mean"])]
            for name, x, y in pairs:
                if not math.isfinite(y) or abs(y - x) > atol + rtol * abs(x):
                    out.append(f"{family}.{output}.{name}: stored {x!r}, got {y!r} (diff {y - x:.3g})")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="compare with the stored numbers, write nothing")
    ap.add_argument("--only", nargs="+", choices=FAMILIES, help="recompute these families (e.g. new ones) and keep "
                    "the stored numbers of the others")
    args = ap.parse_args(argv)
    if args.only:
        torch.set_num_threads(1)
        stored = json.loads(PATH.read_text())["families"]
        actual = {f: compute(f) if f in args.only else stored[f] for f in FAMILIES}
    else:
        actual = compute_all()
    if args.check:
        diff = differences(json.loads(PATH.read_text())["families"], actual)
        print("\n".join(diff) if diff else f"all numbers within atol {ATOL}, rtol {RTOL}")
        return 1 if diff else 0
    from ldmcli.fileio import atomic_write_text

    about = "written by tests/make_regression.py (see its docstring); read by tests/test_regression.py"
    families = ",\n".join(
        f"  {json.dumps(family)}: {{\n" + ",\n".join(f"   {json.dumps(k)}: {json.dumps(v)}" for k, v in outputs.items())
        + "\n  }"
        for family, outputs in actual.items()
    )  # one line per output: a regeneration shows in a diff as the outputs that changed
    text = (f'{{\n "_about": {json.dumps(about)},\n "torch": {json.dumps(torch.__version__.split("+")[0])},\n'
            f' "families": {{\n{families}\n }}\n}}\n')
    assert json.loads(text)["families"] == actual
    atomic_write_text(PATH, text)
    print(f"wrote {PATH} ({len(actual)} families)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
