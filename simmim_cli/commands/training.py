"""Running a training command: the run folder, then training here, in ``--gpus``/``--nproc`` workers, or as one
worker of torchrun/SLURM.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from .. import checkpoints, distributed, mixture, storage
from ..config import TrainConfig
from ..data_sources import data_shards, is_image_folder
from ..engine import Trainer
from ..errors import SimmimError
from ..pipeline import default_workers


def resolve_run_paths(config: TrainConfig, runs_root: Path = Path("runs")) -> None:
    """Fixes ``config.output`` and ``config.resume`` to concrete paths before any worker starts.

    ``--resume auto`` takes the newest checkpoint in ``--output``, or without ``--output`` in the newest
    ``runs/<command>-*`` folder; a new run refuses a folder that already holds a run unless ``--force``.
    """
    if config.resume == "auto":
        found = (checkpoints.latest_checkpoint(Path(config.output)) if config.output
                 else checkpoints.newest_run_checkpoint(runs_root, config.command))
        if found is None:
            where = config.output or f"{runs_root}/{config.command}-*"
            print(f"note: --resume auto found no checkpoint in {where}; starting a new run", file=sys.stderr)
            config.resume = None
        else:
            config.resume = str(found)
            config.output = config.output or str(found.parent)
    elif config.resume:
        check_resume_exists(config)
        config.output = config.output or str(Path(config.resume).parent)
    if config.resume:
        check_resumed_param_groups(config)
    if config.output is None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        config.output = str(runs_root / f"{config.command}-{stamp}")
    output = Path(config.output)
    if output.exists() and not output.is_dir():
        raise SimmimError(f"--output {output} is a file; give a folder")
    # a read-only or forbidden output fails here, in one line, before any model is built or worker launched
    storage.check_writable(output)
    storage.report_stale_temporaries(output)  # left by a save that was killed (kill -9, a node that died)
    if config.resume is None and output.is_dir():
        previous = checkpoints.list_checkpoints(output) + list(output.glob("metrics.jsonl"))
        if previous and not config.force:
            raise SimmimError(f"{output} already holds a run ({previous[-1].name}); continue it with --resume auto, "
                              "or pass --force to start over in it, or choose another --output")
        foreign = [] if previous or config.force else foreign_files(output)
        if foreign:
            raise SimmimError(f"--output {output} holds files but no simmim run ({', '.join(foreign[:3])}"
                              f"{', ...' if len(foreign) > 3 else ''}); give a new or empty folder, or pass --force to "
                              "write the run into it (its config.yaml and metrics.jsonl would be replaced)")
        with storage.writing(output):
            for path in previous + list(output.glob("preview-*.png")) + list(output.glob("metrics.png")):
                checkpoints.remove_checkpoint(path)


def check_resume_exists(config: TrainConfig) -> None:
    """A ``--resume`` path (not ``auto``) names a checkpoint file or a sharded checkpoint folder."""
    if config.resume and config.resume != "auto" and not (Path(config.resume).is_file()
                                                          or checkpoints.is_sharded_checkpoint(config.resume)):
        raise SimmimError(f"--resume {config.resume}: no such checkpoint; use --resume auto to take the newest")


def foreign_files(folder: Path) -> list[str]:
    """The names in ``folder`` when it holds files but no run of ours (a config.yaml that is not a simmim run's,
    someone's notes, another tool's output), else []: a run never writes into such a folder without --force.
    Hidden names (temporary files, the write probe) do not count."""
    names = sorted(path.name for path in folder.iterdir() if not path.name.startswith("."))
    return [] if not names or _holds_our_config(folder / "config.yaml") else names


def _holds_our_config(path: Path) -> bool:
    """Whether ``path`` is the config.yaml of a simmim run (e.g. one stopped before its first log line)."""
    import yaml

    try:
        values = yaml.safe_load(path.read_text()) if path.is_file() else None
    except (OSError, ValueError, yaml.YAMLError):  # unreadable, not UTF-8, not YAML: not ours
        return False
    return isinstance(values, dict) and {"model", "img_size", "epochs", "base_lr", "warmup_epochs"} <= set(values)


def check_resumed_param_groups(config: TrainConfig) -> None:
    """The optimizer state of a resumed run fits only the parameter groups it was made with (config.yaml of the
    run says which; runs from before --param-groups had timm's)."""
    wanted = getattr(config, "param_groups", None)
    saved = Path(config.resume).parent / "config.yaml"
    if wanted is None or not saved.is_file():
        return
    import yaml

    try:
        previous = (yaml.safe_load(saved.read_text()) or {}).get("param_groups", "timm")
    except yaml.YAMLError:
        return  # the checkpoint itself is checked when it loads
    if previous != wanted:
        raise SimmimError(f"{config.resume} was trained with --param-groups {previous}, whose optimizer state does "
                          f"not fit --param-groups {wanted}; resume with --param-groups {previous}")


def run_training(config: TrainConfig, prepare, build) -> None:
    """Trains here, in ``--gpus``/``--nproc`` workers, or as one worker of torchrun/SLURM.

    ``prepare(config)`` checks inputs and fixes paths once, before any worker starts (under torchrun/SLURM: on
    rank 0, which hands the result to the others); ``build(config, context) -> (task, dataset)`` runs in every
    training process.
    """
    if distributed.launched_env(config) is not None:
        _train_process(config, prepare, build, prepare_here=True)
        return
    config.split_global_batch(distributed.procs_per_node(config) * config.nnodes)  # a mistake fails before launch
    prepare(config)
    if distributed.needs_launch(config):
        distributed.launch(_train_process, config, prepare, build, False)
    else:
        _train_process(config, prepare, build, False)


def _train_process(config: TrainConfig, prepare, build, prepare_here: bool) -> None:
    context = distributed.setup(config)
    try:
        if prepare_here and context.is_main:
            prepare(config)
        config = distributed.broadcast_object(config)  # rank 0's paths and resolved settings on every rank
        config.split_global_batch(context.world_size)
        if config.workers is None:
            config.workers = default_workers(context.local_world_size)
        torch.manual_seed(config.seed)  # the same initial weights on every rank
        task, dataset = build(config, context)
        torch.manual_seed(config.seed + context.rank)  # different dropout and drop-path draws per rank
        Trainer(task, config, context).fit(dataset, max_steps=config.max_steps or None)
    finally:
        distributed.teardown()


def prepare_run(config: TrainConfig) -> None:
    """The run folder; on the other nodes of a multi-node job it is node 0's business."""
    distributed.check_devices(config)
    if config.node_rank == 0:
        resolve_run_paths(config)


def prepare_data(config: TrainConfig, *fields: str, labels: bool = False) -> None:
    """``--data`` (and the other data options named) as shards: an image folder is written into shards once (see
    :func:`data_sources.data_shards`) here, before any worker starts; the workers get the shard paths with the config.
    Under torchrun/SLURM this runs on rank 0 only; the other nodes of a ``--nnodes`` job take node 0's paths."""
    for name in fields:
        value = getattr(config, name)
        option = "--" + name.replace("_", "-")
        if value is None:
            continue

        def ready(path: str, option: str = option) -> str:
            if getattr(config, "node_rank", 0) != 0:  # single-process commands have no nodes
                if is_image_folder(Path(path)):
                    raise SimmimError(f"{option} {path}: a multi-node job reads shards, not a folder of images; make "
                                      f"them once with simmim make-shards {path} OUT and pass {option} OUT on every "
                                      "node")
                return path
            return data_shards(path, option, labels)

        # --data may name several sources (mixture.py): each is made ready, its share kept
        setattr(config, name, mixture.map_paths(value, ready) if name == "data" else ready(value))
