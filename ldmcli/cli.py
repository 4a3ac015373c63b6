"""The ``ldm`` executable: a typer app whose subcommands live one per module in ``ldmcli.commands``.

Every failure a person can cause becomes one line on stderr and an exit code (2 usage, 1 failure, 130 interrupted);
``--debug`` (or ``LDM_DEBUG=1``) shows the traceback instead.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer
from typer.core import TyperGroup
from typer.exceptions import Abort, Exit, TyperException

from ldmcli import __version__, paths
from ldmcli.errors import LdmError

# libgomp's worker threads spin while they wait for work. When anything else shares the cores (a cron job, a second
# run), a spinning thread that got descheduled stalls every small op: `ldm sample digits` took 47 s instead of 4.5 s
# on a 2-core machine at load 3. Passive waiting costs little on a quiet machine. Set before torch is imported (the
# commands import it lazily); a value the user set wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _debug_requested(args) -> bool:
    if os.environ.get("LDM_DEBUG", "").strip().lower() in {"1", "true", "yes", "on"}:
        return True
    return "--debug" in (args if args is not None else sys.argv[1:])


def _fail(message: str, code: int) -> None:
    typer.echo(f"ldm: error: {message}", err=True)
    sys.exit(code)


def _hide_flag_types(command) -> None:
    """Show no ``<bool>`` beside flags in ``--help``: a flag takes no value (``--offline``, not ``--offline true``).
    typer prints a parameter's metavar instead of its type when one is set; an empty one prints nothing."""
    for param in getattr(command, "params", ()):
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
    make_help_option = command.get_help_option

    def get_help_option(ctx, make=make_help_option):
        option = make(ctx)
        if option is not None and option.metavar is None:
            option.metavar = ""
        return option

    command.get_help_option = get_help_option
    for sub in getattr(command, "commands", {}).values():
        _hide_flag_types(sub)


class LdmGroup(TyperGroup):
    """Turns exceptions into one-line errors, for the real executable and for tests driving it with a runner."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        _hide_flag_types(self)

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        debug = _debug_requested(args)
        try:
            rv = super().main(args=args, prog_name=prog_name or "ldm", complete_var=complete_var,
                              standalone_mode=False, **extra)
        except Exit as e:
            sys.exit(e.exit_code)
        except (Abort, KeyboardInterrupt):
            typer.echo("ldm: interrupted", err=True)
            sys.exit(130)
        except TyperException as e:  # usage errors (exit 2) and other parser errors
            if debug:
                raise
            code = getattr(e, "exit_code", 2)
            ctx = getattr(e, "ctx", None)
            hint = f" (see 'ldm {ctx.info_name} --help')" if code == 2 and ctx is not None and ctx.parent is not None else ""
            _fail(f"{e.format_message()}{hint}", code)
        except LdmError as e:
            if debug:
                raise
            _fail(str(e), e.exit_code)
        except Exception as e:  # an unexpected bug: still one line unless --debug
            if debug:
                raise
            _fail(f"{type(e).__name__}: {e} (rerun with --debug for the traceback)", 1)
        # standalone_mode=False returns the exit code of ctx.exit() calls (e.g. --help) as rv
        sys.exit(rv if isinstance(rv, int) else 0)


app = typer.Typer(
    cls=LdmGroup,
    name="ldm",
    help="Latent diffusion models from one command: download the model zoo, generate images, inpaint, "
    "retrieve, and train.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"ldm {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    data_dir: Optional[Path] = typer.Option(
        None, "--data-dir", help="Data directory for models and databases (env LDM_HOME).", show_default=False
    ),
    offline: bool = typer.Option(False, "--offline", help="Never use the network (env LDM_OFFLINE=1)."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks instead of one-line errors (env LDM_DEBUG=1)."),
    version: bool = typer.Option(
        False, "--version", callback=_version_callback, is_eager=True, help="Show the version and exit."
    ),
) -> None:
    """Latent diffusion models from one command."""
    # Reset on every invocation: a runner calling main() twice in one process must not inherit the last call's state.
    paths.set_data_dir(data_dir)
    paths.set_offline(offline)


def _register() -> None:
    """Add each implemented subcommand. A command is registered only once it works."""
    from ldmcli import commands

    for module in commands.implemented():
        module.register(app)


_register()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
