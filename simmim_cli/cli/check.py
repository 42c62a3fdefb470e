"""``simmim check [OPTIONS] pretrain|finetune|linear-probe ...``: the command's own options, checked instead of run.

Each subcommand takes exactly the options of the command it checks (its parameters are the real command's,
read from its signature), so a launch line becomes a check by putting ``simmim check`` in front of it. The
check's own options come before the command's name; --json, --find-batch and --steps also after it.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Annotated

import typer

from ..config import LinearProbeConfig, PretrainConfig
from .app import app, config_from_context, handle_errors
from .training import finetune, finetune_config, linear_probe, pretrain

check_app = typer.Typer(
    help="Check a training run before launching it: the same processes, loader and training steps for a minute "
         "or two, then the environment, data, memory, speed, a forecast of the epoch and run time, and what holds "
         "it back. Writes nothing (a temporary folder only) unless --output is given.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(check_app, name="check", epilog=(
    "Put `simmim check` in front of the launch line:\n\n"
    "  simmim check pretrain --data shards/ --gpus 8 --batch-size 256\n\n"
    "  simmim check --find-batch --json pretrain --recipe recipes/pretrain_vit_base_224_100ep.yaml --data shards/"))


@check_app.callback()
def check_options(
    ctx: typer.Context,
    json: Annotated[bool, typer.Option("--json", help="Print the report as one JSON object.")] = False,
    output: Annotated[str | None, typer.Option(
        help="Folder to keep the report in (check.json, check.txt); never a run folder.", show_default=False)] = None,
    find_batch: Annotated[bool, typer.Option(
        "--find-batch", help="Also find the largest batch per process that fits in memory, with real steps "
        "(doubling, then bisecting).")] = False,
    steps: Annotated[int | None, typer.Option(
        help="Timed optimizer steps per process, after 2 warm-up steps \\[default: as many as take about 5 s, at "
             "least 10].", show_default=False)] = None,
    forecast_gpus: Annotated[list[int] | None, typer.Option(
        help="Also forecast the per-GPU memory on this many GPUs (repeat for several; 8 a node, or the run's "
             "GPUs a node), replicated and sharded, at the run's batch per GPU.", show_default=False)] = None,
) -> None:
    """Will this run work, how fast, and what holds it back?"""
    # a plain dict: this runs before `simmim check pretrain --help` too, which must not import torch
    ctx.obj = {"json": json, "output": output, "find_batch": find_batch, "steps": steps,
               "forecast_gpus": forecast_gpus or []}


CHECK = "Check"  # help panel of the check's own options
# the check's own options, also accepted after the command's name (where users append flags); --output there is
# the run's folder, so the report's folder is given before the name only
CHECK_PARAMETERS = [
    inspect.Parameter("check_json", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=Annotated[
        bool, typer.Option("--json", help="Print the report as one JSON object.", rich_help_panel=CHECK)]),
    inspect.Parameter("check_find_batch", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=Annotated[
        bool, typer.Option("--find-batch", help="Also find the largest batch per process that fits.",
                           rich_help_panel=CHECK)]),
    inspect.Parameter("check_steps", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[
        int | None, typer.Option("--steps", help="Timed optimizer steps per process, after 2 warm-up steps "
                                 "\\[default: as many as take about 5 s, at least 10].",
                                 rich_help_panel=CHECK, show_default=False)]),
]


def _checking(name: str, command, make_config) -> None:
    """Registers ``simmim check NAME`` with the parameters of ``command`` (the real one) plus the check's own."""

    def check_command(ctx: typer.Context, check_json: bool, check_find_batch: bool, check_steps: int | None,
                      **_options) -> None:
        from ..commands.check import CheckOptions, check

        given = CheckOptions(**(ctx.obj or {}))
        options = dataclasses.replace(given, json=given.json or check_json,
                                      find_batch=given.find_batch or check_find_batch,
                                      steps=check_steps if check_steps is not None else given.steps)
        code = check(name, make_config(ctx), options)
        if code:
            raise typer.Exit(code)

    signature = inspect.signature(command, eval_str=True)  # Typer reads the options from this signature
    check_command.__signature__ = signature.replace(parameters=[*signature.parameters.values(), *CHECK_PARAMETERS])
    check_command.__doc__ = (f"Check `simmim {name}` with these options: takes exactly its options "
                             f"(see simmim {name} --help).")
    epilog = f"Example: simmim check {name} --data shards/ --gpus 8"
    check_app.command(name, epilog=epilog)(handle_errors(check_command))


_checking("pretrain", pretrain, lambda ctx: config_from_context(PretrainConfig, ctx))
_checking("finetune", finetune, finetune_config)
_checking("linear-probe", linear_probe, lambda ctx: config_from_context(LinearProbeConfig, ctx))
