"""The ``simmim`` Typer app: one-line errors, ``--debug``, ``--version``, and options → a validated config."""

from __future__ import annotations

import functools
from typing import Annotated, Any

import typer

from .. import __version__, limits, remote
from ..config import resolve_config
from ..errors import SimmimError, debug_enabled, set_debug
from ..redact import terminal
from ..storage import unexpected
from ..summary import command_clock

app = typer.Typer(
    name="simmim",
    help="Self-supervised pretraining of vision transformers with SimMIM, then finetune, evaluate and export.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_show_locals=False,
)

# ---------------------------------------------------------------------------------------------- errors


def handle_errors(command):
    """User errors → one line on stderr and their exit code (2 for bad input, 74 for storage faults); --debug shows
    tracebacks."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            with command_clock():  # a run's summary counts its time from here, preparation and launch included
                return command(*args, **kwargs)
        except SimmimError as error:
            if debug_enabled():
                raise
            typer.echo(f"error: {terminal(one_line(error))}", err=True)  # redacted, control characters escaped
            raise typer.Exit(error.exit_code) from None
        except (OSError, RuntimeError) as error:  # a full disk or a forbidden folder that no writer caught
            fault = unexpected(error)
            if fault is None or debug_enabled():
                raise
            typer.echo(f"error: {terminal(str(fault))}", err=True)
            raise typer.Exit(fault.exit_code) from None
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None

    return wrapper


def one_line(error: Exception) -> str:
    """The message of an error; one raised in a data loader worker arrives wrapped in its traceback."""
    text = str(error)
    if "Original Traceback" in text:
        last = text.strip().splitlines()[-1]
        text = last.split(": ", 1)[1] if last.startswith("simmim_cli.errors.") else last
    return text


def _version(value: bool) -> None:
    if value:
        typer.echo(f"simmim-cli {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks instead of one-line errors.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """SimMIM (Xie et al., CVPR 2022): mask 32×32 patches, regress their pixels, learn a ViT/Swin encoder."""
    set_debug(debug)


def config_from_context(config_class: type, ctx: typer.Context) -> Any:
    """The command's parsed options → a validated config (defaults < --recipe < options given)."""
    explicit = {name for name in ctx.params if ctx.get_parameter_source(name).name not in ("DEFAULT", "DEFAULT_MAP")}
    values = dict(ctx.params)
    for name in ("lr_milestones", "log_to"):  # lists: absent means the config's default
        if values.get(name) is None:
            values.pop(name, None)
    if values.get("demo") and "recipe" not in explicit:
        from ..demo import DEMO_SETTINGS

        values.update({k: v for k, v in DEMO_SETTINGS.items() if k not in explicit})
    config = resolve_config(config_class, values, explicit)
    apply_process_settings(config)
    return config


def apply_process_settings(config: Any) -> None:
    """What every process the command starts reads (loader workers, launched processes) from the config: the
    remote retries and shard cache, and the per-sample limits."""
    if hasattr(config, "io_retries"):
        remote.configure(config.io_retries, getattr(config, "shard_cache", None),
                         getattr(config, "shard_cache_size", remote.DEFAULT_CACHE_SIZE))
    if hasattr(config, "max_sample_mb"):
        limits.configure_from(config)


def run() -> None:
    """Entry point of ``python -m simmim_cli``."""
    app(prog_name="simmim")

