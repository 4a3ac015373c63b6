"""One module per subcommand. Each exposes ``register(app)``; commands parse, call the library, and render."""

from __future__ import annotations

import importlib
from types import ModuleType

# Listed in the order `ldm --help` shows them. Add a name here only when the command works.
COMMANDS: list[str] = ["download", "txt2img", "sample", "inpaint", "upscale", "build_index", "knn2img", "train_ae",
                       "train_ldm", "eval"]


def implemented() -> list[ModuleType]:
    return [importlib.import_module(f"ldmcli.commands.{name}") for name in COMMANDS]
