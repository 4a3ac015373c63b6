"""Models shipped inside the package (the zoo's ``builtin`` entries, e.g. ``digits``): how a run of
``ldm train-ldm`` becomes one.

:func:`package_model` reads a trained LDM (a run folder or checkpoint, as ``ldm sample -r`` takes), puts the EMA
weights in place of the raw ones (what upstream samples with), and writes ``DEST/model.safetensors`` (float32,
config in its metadata) and ``DEST/config.yaml`` (the same config with ``use_ema: false``, since the shipped
weights already are the EMA ones). ``python -m ldmcli.builtin RUN DEST`` does the same from a shell.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

import yaml

from ldmcli import checkpoint as ckpt_io
from ldmcli import config as model_config
from ldmcli.errors import LdmError, UsageError
from ldmcli.fileio import atomic_write_text
from ldmcli.loading import META_CONFIG, load

WEIGHTS = "model.safetensors"
CONFIG = "config.yaml"


def package_model(source: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Write the trained LDM at ``source`` (run folder, ``model.ckpt`` or ``last.ckpt``) as ``dest/model.safetensors``
    plus ``dest/config.yaml``, both atomically; returns the weights' path."""
    src = Path(source).expanduser()
    if src.is_dir():
        ckpt = next((c for c in (src / "model.ckpt", src / "checkpoints" / "last.ckpt") if c.is_file()), None)
        if ckpt is None:
            raise UsageError(f"{src} holds no model.ckpt or checkpoints/last.ckpt")
        config_file = src / CONFIG
    else:
        ckpt = src
        config_file = next((c for c in (src.parent / CONFIG, src.parent.parent / CONFIG) if c.is_file()),
                           src.parent / CONFIG)
    if not config_file.is_file():
        raise UsageError(f"no {CONFIG} next to {ckpt}")
    loaded = load(config_file, ckpt=ckpt, ema=True)
    model, cfg = loaded.model, loaded.config
    if cfg.ldm is None:
        raise UsageError(f"{src} is a first stage, not a latent diffusion model")
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.ldm, use_ema=False))
    doc = model_config.config_to_dict(cfg)
    state = {k: v.detach().float().contiguous() if v.is_floating_point() else v.detach().contiguous()
             for k, v in model.state_dict().items()}
    out = Path(dest).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    weights = ckpt_io.save_safetensors(out / WEIGHTS, state, metadata={META_CONFIG: json.dumps(doc, sort_keys=True)},
                                       global_step=loaded.global_step)
    atomic_write_text(out / CONFIG, yaml.safe_dump(doc, sort_keys=False))
    return weights


def main(argv: list[str] | None = None) -> int:
    """``python -m ldmcli.builtin RUN DEST``."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[0] in ("-h", "--help"):
        sys.stderr.write("usage: python -m ldmcli.builtin RUN_FOLDER_OR_CKPT DEST_FOLDER\n")
        return 2
    try:
        path = package_model(args[0], args[1])
    except LdmError as e:
        sys.stderr.write(f"error: {e}\n")
        return e.exit_code
    sys.stderr.write(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB) and {path.parent / CONFIG}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
