"""Few-step sampler accuracy (issue 16): model x guidance scale x sampler x spacing x steps, RMS distance of the final
latent (and of the decoded image, where the model has a decoder) to the 1000-step DDIM solution from the same x_T.

Models:

* ``digits``: the built-in class-conditional LDM (``ldm sample digits``), guidance against its null class;
* ``text``: a tiny text-conditional eps-MLP on 2-d mixtures, trained here in seconds (ldmcli.sampling.accuracy),
  guidance against the empty prompt;
* ``uncond``: the same toy without conditioning (issue 4's test model), scale 1 only.

For each (model, scale) the target is DDIM with 50 evenly spaced steps ("DDIM-50"); the table marks the fewest model
calls that reach its relative error. ``--write-auto`` rewrites ldmcli/sampling/auto.py from the result: per scale, the
registered sampler + spacing whose step count meets DDIM-50's error on every model measured at that scale with the
fewest calls.

    python benchmarks/sampler_accuracy.py                              # everything (~20 min on 2 busy cores)
    python benchmarks/sampler_accuracy.py --quick                      # toys only, fewer steps: a smoke run
    python benchmarks/sampler_accuracy.py --models digits --scales 1,5 --json out.json --plot out.png
    python benchmarks/sampler_accuracy.py --write-auto                 # regenerate the --sampler auto table
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from functools import partial
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

STEPS = (4, 5, 6, 7, 8, 9, 10, 12, 14, 16, 20)
SAMPLER_NAMES = ("ddim", "dpmpp", "dpmpp3m", "unipc", "unipc-bh1")
SPACING_NAMES = ("logsnr", "time", "karras", "trailing")


def cpu_flags() -> str:
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return platform.processor() or "unknown CPU"
    names = [("avx2", "AVX2"), ("avx512f", "AVX-512"), ("avx512_bf16", "AVX512-BF16"), ("amx_tile", "AMX")]
    return ", ".join(label for flag, label in names if flag in flags) or "no AVX2"


def variants():
    """Sampler name -> (sample_fn, extra calls, registered?): the registry plus the guidance-fix variants."""
    from ldmcli.sampling import SAMPLERS
    from ldmcli.sampling.multistep import sample_dpmpp_3m, sample_unipc
    from ldmcli.sampling.samplers import sample_dpmpp_2m

    out = {name: (SAMPLERS[name].sample_fn, SAMPLERS[name].extra_calls, True) for name in SAMPLER_NAMES}
    out["dpmpp/no-lof"] = (partial(sample_dpmpp_2m, lower_order_final=False), 0, False)
    out["dpmpp3m/no-lof"] = (partial(sample_dpmpp_3m, lower_order_final=False), 0, False)
    out["dpmpp3m/exact"] = (partial(sample_dpmpp_3m, exact_quadratic=True), 0, False)
    out["unipc/o3"] = (partial(sample_unipc, variant="bh2", order=3), 0, False)
    out["unipc-bh1/no-lof"] = (partial(sample_unipc, variant="bh1", lower_order_final=False), 0, False)
    return out


def load_digits(n: int):
    import torch

    from ldmcli.fastpath import decode_latents
    from ldmcli.loading import load
    from ldmcli.pipelines.generation import class_range
    from ldmcli.sampling import DiscreteSchedule, model_denoiser

    loaded = load("digits")
    model, cfg = loaded.model, loaded.config
    n_real, null = class_range(cfg)
    schedule = DiscreteSchedule.from_model(model)
    shape = (cfg.ldm.channels, cfg.ldm.image_size, cfg.ldm.image_size)
    x_T = torch.randn((n, *shape), generator=torch.Generator().manual_seed(0))
    key = getattr(model, "cond_stage_key", "class_label")
    with torch.no_grad():
        cond = model.get_learned_conditioning({key: torch.arange(n) % n_real})
        uncond = model.get_learned_conditioning({key: torch.full((n,), null)})

    def eps(scale: float):
        return model_denoiser(model, cond, uncond if scale != 1.0 else None, scale, schedule=schedule)

    def decode(z):
        with torch.no_grad():
            return decode_latents(model, z).double()

    return schedule, x_T, eps, decode


def load_toy(text: bool, n: int, train_steps: int):
    import torch

    from ldmcli.models.schedule import make_beta_schedule
    from ldmcli.sampling import DiscreteSchedule
    from ldmcli.sampling.accuracy import MIXTURES, toy_eps, train_toy_denoiser

    schedule = DiscreteSchedule.from_betas(make_beta_schedule("linear", 1000, 0.00085, 0.0120))
    net = train_toy_denoiser(schedule, text=text, steps=train_steps)
    prompts = [list(MIXTURES)[k % len(MIXTURES)] for k in range(n)] if text else None
    x_T = torch.randn(n, 2, generator=torch.Generator().manual_seed(1))
    return schedule, x_T, (lambda scale: toy_eps(net, prompts, scale)), None


def run(args) -> dict:
    import torch

    from ldmcli.sampling import SPACINGS
    from ldmcli.sampling.accuracy import fewest_calls, measure, reference_solutions

    if args.threads:
        torch.set_num_threads(args.threads)
    table = {"cpu": cpu_flags(), "threads": torch.get_num_threads(), "steps": list(args.steps), "models": {}}
    sams = {k: v for k, v in variants().items() if k.split("/")[0] in args.samplers}
    for model_name in args.models:
        t0 = time.perf_counter()
        if model_name == "digits":
            schedule, x_T, eps_for, decode = load_digits(args.images)
        else:
            schedule, x_T, eps_for, decode = load_toy(model_name == "text", args.toy_points, args.train_steps)
        scales = [1.0] if model_name == "uncond" else args.scales
        print(f"== {model_name}: {tuple(x_T.shape)} from x_T, loaded/trained in {time.perf_counter() - t0:.0f} s",
              flush=True)
        table["models"][model_name] = {}
        for scale in scales:
            t0 = time.perf_counter()
            eps = eps_for(scale)
            refs = reference_solutions(eps, x_T, schedule)
            ref_px = {0: decode(refs.level0), -1: decode(refs.clean)} if decode else None
            common = dict(decode=decode, reference_pixels=ref_px)
            target = measure(sams["ddim"][0], SPACINGS["time"](schedule, 50), eps, x_T, schedule, refs,
                             name=("ddim", "time", 50), **common).as_dict()
            rows = []
            for name, (fn, extra, registered) in sams.items():
                for spacing in args.spacings:
                    for steps in args.steps:
                        grid = SPACINGS[spacing](schedule, steps)
                        row = measure(fn, grid, eps, x_T, schedule, refs, name=(name, spacing, steps),
                                      **common).as_dict()
                        row["registered"] = registered
                        rows.append(row)
            best = fewest_calls([r for r in rows if r["registered"]], target["rel"])
            best_px = fewest_calls([r for r in rows if r["registered"]], target["pixels_rel"], key="pixels_rel") \
                if decode else None
            table["models"][model_name][str(scale)] = {"ddim50": target, "rows": rows, "best": best,
                                                       "best_pixels": best_px}
            show = f"{best['sampler']} {best['spacing']} {best['calls']} calls ({best['rel']:.4f})" if best else "none"
            print(f"  scale {scale}: DDIM-50 rel {target['rel']:.4f}"
                  + (f" (pixels {target['pixels_rel']:.4f})" if decode else "")
                  + f"; fewest calls meeting it: {show}  [{time.perf_counter() - t0:.0f} s]", flush=True)
            print_rows(rows, args.steps)
            if args.json:  # after every scale, so a run cut short keeps what it measured
                from ldmcli.fileio import atomic_write_text

                atomic_write_text(args.json, json.dumps(table, indent=1))
    return table


def print_rows(rows, steps) -> None:
    by = {}
    for r in rows:
        by.setdefault((r["sampler"], r["spacing"]), {})[r["steps"]] = r
    for (sampler, spacing), got in by.items():
        cells = " ".join(f"{got[s]['rel']:7.4f}" if s in got else "      -" for s in steps)
        print(f"    {sampler:17s} {spacing:8s} {cells}")


def meets(row: dict, target: dict) -> bool:
    """At most DDIM-50's relative error in the latent and, for models with a decoder, in the decoded image."""
    pixels_ok = target.get("pixels_rel") is None or (
        row.get("pixels_rel") is not None and row["pixels_rel"] <= target["pixels_rel"])
    return row["rel"] <= target["rel"] and pixels_ok


def auto_table(table: dict, models: list[str] | None = None) -> list[tuple[float, str, int, str, str]]:
    """Per scale: the registered (sampler, spacing) whose steps meet DDIM-50 (:func:`meets`) on every model in
    ``models`` (None: all measured) at that scale, with the fewest calls. Returns (scale, sampler, steps, spacing,
    note) rows."""
    chosen = {m: e for m, e in table["models"].items() if models is None or m in models}
    scales = sorted({float(s) for m in chosen.values() for s in m})
    out = []
    for scale in scales:
        need: dict[tuple[str, str], tuple[int, int]] | None = None
        for entry in chosen.values():
            if str(scale) not in entry:
                continue
            per = entry[str(scale)]
            first: dict[tuple[str, str], tuple[int, int]] = {}
            for r in sorted(per["rows"], key=lambda r: r["steps"]):
                key = (r["sampler"], r["spacing"])
                if r["registered"] and meets(r, per["ddim50"]) and key not in first:
                    first[key] = (r["steps"], r["calls"])
            need = first if need is None else {k: max(need[k], first[k]) for k in need.keys() & first.keys()}
        if need:
            (sampler, spacing), (steps, calls) = min(need.items(), key=lambda kv: (kv[1][1], kv[0]))
            out.append((scale, sampler, steps, spacing, f"{calls} calls"))
        else:
            out.append((scale, "dpmpp", 20, "logsnr", "no configuration met DDIM-50 on every model; issue 4's choice"))
    return out


def write_auto(rows, path: Path) -> None:
    from ldmcli.fileio import atomic_write_text

    text = path.read_text()
    start, end = text.index("AUTO_TABLE"), text.index("\n)\n", text.index("AUTO_TABLE")) + 3
    lines = ["AUTO_TABLE: tuple[tuple[float, str, int, str], ...] = (",
             "    # (guidance scale up to, sampler, steps, spacing): written by benchmarks/sampler_accuracy.py"]
    for k, (scale, sampler, steps, spacing, note) in enumerate(rows):
        up_to = "float(\"inf\")" if k == len(rows) - 1 else repr(scale)
        lines.append(f"    ({up_to}, {sampler!r}, {steps}, {spacing!r}),  # measured at scale {scale}: {note}")
    atomic_write_text(path, text[:start] + "\n".join(lines) + "\n)\n" + text[end:])


def plot(table: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(m, s) for m, per in table["models"].items() for s in per]
    cols = 4
    rows_n = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.2 * cols, 3.4 * rows_n), squeeze=False)
    for ax, (model, scale) in zip(axes.flat, panels):
        per = table["models"][model][scale]
        lines = {}
        for r in per["rows"]:
            if r["registered"]:
                lines.setdefault((r["sampler"], r["spacing"]), []).append(r)
        for k, sampler in enumerate(SAMPLER_NAMES):  # fixed colours; each on the logSNR grid (DDIM: uniform in t)
            key = (sampler, "time" if sampler == "ddim" else "logsnr")
            if key not in lines:
                continue
            pts = sorted(lines[key], key=lambda r: r["calls"])
            ax.plot([p["calls"] for p in pts], [p["rel"] for p in pts], marker="o", ms=3, color=f"C{k}",
                    label=f"{key[0]} ({key[1]})")
        ax.axhline(per["ddim50"]["rel"], color="k", ls="--", lw=1, label="DDIM 50 steps")
        ax.set_yscale("log")
        ax.set_title(f"{model}, scale {scale}")
        ax.set_xlabel("steps (= model calls)")
        ax.set_ylabel("relative RMS error")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="digits,text,uncond")
    p.add_argument("--scales", default="1,3,5,7.5")
    p.add_argument("--samplers", default=",".join(SAMPLER_NAMES))
    p.add_argument("--spacings", default=",".join(SPACING_NAMES))
    p.add_argument("--steps", default=",".join(map(str, STEPS)))
    p.add_argument("--images", type=int, default=8, help="digits images (one x_T each)")
    p.add_argument("--toy-points", type=int, default=256)
    p.add_argument("--train-steps", type=int, default=1000, help="training steps of the toy models")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="toy models, steps 4,6,8,10,15,20: a smoke run")
    p.add_argument("--json", type=Path, default=None, help="write the table here")
    p.add_argument("--plot", type=Path, default=None, help="write the error-vs-calls plot here (PNG)")
    p.add_argument("--write-auto", action="store_true", help="rewrite ldmcli/sampling/auto.py from this run")
    p.add_argument("--auto-models", default=None, help="models the auto choice must satisfy (default: all measured)")
    p.add_argument("--from-json", type=Path, nargs="*", default=None,
                   help="skip measuring: merge these --json outputs (their models and scales) and report/plot them")
    args = p.parse_args()
    args.models = args.models.split(",")
    args.scales = [float(s) for s in args.scales.split(",")]
    args.samplers = args.samplers.split(",")
    if "ddim" not in args.samplers:
        args.samplers.insert(0, "ddim")
    args.spacings = args.spacings.split(",")
    args.steps = [int(s) for s in args.steps.split(",")]
    if args.quick:
        args.models = [m for m in args.models if m != "digits"] or ["text"]
        args.steps = [4, 6, 8, 10, 15, 20]
    if args.from_json:
        table = {"models": {}}
        for path in args.from_json:
            part = json.loads(path.read_text())
            table.update({k: v for k, v in part.items() if k != "models"})
            for model, scales in part["models"].items():
                table["models"].setdefault(model, {}).update(scales)
    else:
        table = run(args)
    print(f"CPU: {table['cpu']}, {table['threads']} torch threads")
    auto = auto_table(table, args.auto_models.split(",") if args.auto_models else None)
    for scale, sampler, steps, spacing, note in auto:
        print(f"auto at scale <= {scale}: {sampler} {steps} steps, {spacing} spacing ({note})")
    table["auto"] = auto
    if args.json:
        from ldmcli.fileio import atomic_write_text

        atomic_write_text(args.json, json.dumps(table, indent=1))
    if args.plot:
        plot(table, args.plot)
    if args.write_auto:
        write_auto(auto, REPO / "ldmcli" / "sampling" / "auto.py")


if __name__ == "__main__":
    main()
