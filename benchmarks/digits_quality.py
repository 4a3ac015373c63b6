"""Quality of the built-in ``digits`` model (issue 8) and the accuracy of the few-step samplers on it (issue 4).

Prints three measurements:

1. class-conditional accuracy: 50 samples per class (500), downsampled to 8x8 and labelled by an SVC fitted on the
   real 8x8 digits; the fraction labelled with the class that was asked for (target >= 90%);
2. the unconditional (null-class) sample set: how many of 200 samples the SVC puts in each class (target: all 10);
3. DPM-Solver++(2M) 20 steps and DDIM 50 steps (eta 0) against the DDIM solution through every timestep
   ("1000-step DDIM") from the same x_T: issue 4's relative RMS distance (ldmcli.sampling.accuracy), plus DDIM on
   upstream's grid and the decoded images (DPM-Solver++ should be the closer one).

    python benchmarks/digits_quality.py                       # the shipped model, ldm sample's defaults
    python benchmarks/digits_quality.py --scale 3 --eta 0     # guided, deterministic DDIM
    python benchmarks/digits_quality.py --model logs/<run>    # a train-ldm run
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="digits", help="zoo name, run folder or .safetensors (default: digits)")
    p.add_argument("--per-class", type=int, default=50)
    p.add_argument("--unconditional", type=int, default=200)
    p.add_argument("--sampler", default="ddim", help="ddim, plms, dpmpp or ddpm (default ddim, as ldm sample)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--eta", type=float, default=None, help="default: 1.0 for DDIM (ldm sample's default), else 0")
    p.add_argument("--scale", type=float, default=1.0, help="classifier-free guidance scale (default 1: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--accuracy-images", type=int, default=20, help="images in the sampler accuracy check")
    p.add_argument("--skip-samplers", action="store_true", help="skip the 1000-step sampler accuracy check")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = p.parse_args()

    import torch

    from ldmcli.datasets import digits
    from ldmcli.loading import load

    if args.threads:
        torch.set_num_threads(args.threads)
    eta = (1.0 if args.sampler == "ddim" else 0.0) if args.eta is None else args.eta
    model = load(args.model)
    print(f"model {model.name}: step {model.global_step}, torch threads {torch.get_num_threads()}")
    t0 = time.perf_counter()
    clf = digits.fit_classifier()
    sampling = dict(seed=args.seed, sampler=args.sampler, steps=args.steps, eta=eta, scale=args.scale,
                    batch_size=args.batch_size)
    print(f"sampling: {args.sampler} {args.steps} steps, eta {eta}, guidance scale {args.scale}, seeds from "
          f"{args.seed}")

    acc, per = digits.conditional_accuracy(model, clf, args.per_class, **sampling)
    n = args.per_class * len(per)
    print(f"class-conditional accuracy: {acc:.1%} of {n} samples ({args.per_class} per class) "
          f"[target >= 90%]   ({time.perf_counter() - t0:.0f} s)")
    print("  per class: " + "  ".join(f"{c}:{a:.0%}" for c, a in enumerate(per)))

    t1 = time.perf_counter()
    hist = digits.class_histogram(model, clf, args.unconditional, **{**sampling, "seed": args.seed + 100_000})
    covered = int((hist > 0).sum())
    print(f"unconditional (null class) samples: {covered}/10 classes covered by {args.unconditional} samples "
          f"[target 10]   ({time.perf_counter() - t1:.0f} s)")
    print("  counts: " + "  ".join(f"{c}:{k}" for c, k in enumerate(hist.tolist())))

    if not args.skip_samplers:
        t2 = time.perf_counter()
        errs = digits.sampler_errors(model, args.accuracy_images, seed=args.seed)
        print(f"sampler accuracy vs DDIM through every timestep (eta 0, no guidance), {args.accuracy_images} images "
              f"from one fixed x_T, relative RMS distance   ({time.perf_counter() - t2:.0f} s)")
        print(f"  DPM-Solver++(2M) 20 steps      {errs['dpmpp']:.4f}   (pixels {errs['dpmpp/pixels']:.4f})")
        print(f"  DDIM 50 steps, same span      {errs['ddim']:.4f}")
        print(f"  DDIM 50 steps, upstream grid  {errs['ddim-upstream']:.4f}   (pixels "
              f"{errs['ddim-upstream/pixels']:.4f}; what ldm sample runs)")
        ratio = errs["ddim"] / max(errs["dpmpp"], 1e-12)
        print(f"  DDIM-50 error / DPM-Solver++-20 error: {ratio:.1f}x  "
              f"({'DPM-Solver++ 20 steps is closer' if ratio > 1 else 'DDIM 50 steps is closer'})")

if __name__ == "__main__":
    main()
