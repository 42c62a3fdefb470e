"""Processes and devices: launching workers with torch's elastic launcher, joining a process group, rank-0 helpers.

``--gpus N`` (or ``--nproc N``) on one machine starts N workers through ``torch.distributed.launcher``, the
machinery behind torchrun. A process started by torchrun or SLURM already knows its rank and joins that group.
"""

from __future__ import annotations

import datetime
import logging
import os
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .errors import Interrupted, SimmimError, debug_enabled
from .storage import StorageError, unexpected


@dataclass
class Context:
    """Where this process runs: its rank in the job and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: torch.device = torch.device("cpu")
    host_group: Any = None  # a gloo group for host-side flags (None: the default group is gloo already)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launched_env(config: Any = None) -> dict[str, int] | None:
    """Rank variables when a launcher (torchrun, SLURM's srun, our own) started this process, else None.

    SLURM's variables count only when this command does not launch processes itself: ``--gpus 8`` typed in an
    ``salloc``/``sbatch`` shell (where ``SLURM_NTASKS`` describes the allocation) starts its own 8 workers.
    """
    env = os.environ
    if "WORLD_SIZE" in env and "RANK" in env:
        return {"rank": int(env["RANK"]), "world_size": int(env["WORLD_SIZE"]),
                "local_rank": int(env.get("LOCAL_RANK", 0)),
                "local_world_size": int(env.get("LOCAL_WORLD_SIZE", 1))}
    if config is not None and explicit_launch(config):
        return None
    if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in env:
        return {"rank": int(env["SLURM_PROCID"]), "world_size": int(env["SLURM_NTASKS"]),
                "local_rank": int(env.get("SLURM_LOCALID", 0)),
                "local_world_size": int(env.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0])}
    return None


def procs_per_node(config: Any) -> int:
    return max(config.gpus, config.nproc, 1)


def explicit_launch(config: Any) -> bool:
    """``--gpus``/``--nproc`` above 1 or ``--nnodes``: this command starts its worker processes itself."""
    return procs_per_node(config) > 1 or config.nnodes > 1


def needs_launch(config: Any) -> bool:
    """True when this command should start worker processes itself."""
    return launched_env(config) is None and explicit_launch(config)


def pick_device(requested: str, local_rank: int = 0) -> torch.device:
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SimmimError("CUDA was requested (--gpus or --device cuda) but torch sees no GPU; "
                          "use --device cpu (and --nproc N for several CPU processes)")
    # modulo: under srun --gpus-per-task=1 each task sees one device, whatever its local rank
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def setup(config: Any) -> Context:
    """Joins the process group when there is one (NCCL on GPUs, gloo on CPUs) and picks this process's device."""
    env = launched_env(config)
    if env is None:
        device = pick_device("cuda" if config.gpus else config.device)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        return Context(device=device)
    device = pick_device("cuda" if config.gpus else config.device, env["local_rank"])
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        # share the machine's cores between the processes instead of oversubscribing them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // env["local_world_size"]))
    if env["world_size"] > 1 and not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ:  # SLURM without torchrun
            os.environ.setdefault("MASTER_ADDR", config.master_addr)
            os.environ.setdefault("MASTER_PORT", str(config.master_port))
        dist.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo",
            rank=env["rank"], world_size=env["world_size"],
            timeout=datetime.timedelta(minutes=config.dist_timeout),
            device_id=device if device.type == "cuda" else None,
        )
    # host-side flags (a stop request) are reduced over gloo: reading an NCCL result would stall the GPU queue
    host_group = dist.new_group(backend="gloo") if env["world_size"] > 1 and device.type == "cuda" else None
    return Context(device=device, host_group=host_group, **env)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def launch(entrypoint: Callable[..., Any], config: Any, *args: Any) -> Any:
    """Runs ``entrypoint(config, *args)`` in ``--gpus``/``--nproc`` processes per node on ``--nnodes`` nodes and
    returns what this node's first process returned (on node 0: rank 0's result).

    A worker that fails stops the whole job; the error names the rank and its message.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    nproc = procs_per_node(config)
    launch_config = LaunchConfig(
        min_nodes=config.nnodes,
        max_nodes=config.nnodes,
        nproc_per_node=nproc,
        run_id="simmim",
        # torchrun's rendezvous when given --master-addr: fixed node ranks, a TCP store on the master node
        rdzv_backend="static",
        rdzv_endpoint=f"{config.master_addr}:{config.master_port}",
        rdzv_configs={"rank": config.node_rank},
        max_restarts=0,
        monitor_interval=0.5,
        start_method="spawn",
    )
    quiet = not debug_enabled()
    if quiet:  # the agent logs each failed worker's traceback; the one-line error below says what matters
        for name in [*logging.Logger.manager.loggerDict, "torch.distributed.elastic"]:
            if name.startswith("torch.distributed.elastic"):  # each of its loggers has its own level
                logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        return elastic_launch(launch_config, _worker)(entrypoint, config, *args).get(0)
    except ChildFailedError as error:
        rank, failure = min(error.failures.items(), key=lambda item: (item[1].exitcode == 130, item[0]))
        message = _failure_message(failure)
        if failure.exitcode == Interrupted.exit_code:
            raise Interrupted(message) from None
        known = failure.exitcode in (SimmimError.exit_code, StorageError.exit_code)  # a one-line error of ours
        hint = " (run with --debug for the traceback)" if not known and quiet else ""
        kind = StorageError if failure.exitcode == StorageError.exit_code else SimmimError
        raise kind(f"worker rank {rank} failed: {message}{hint}",
                   exit_code=failure.exitcode if failure.exitcode > 0 else 1) from None
    except SignalException as signal_exception:
        # Ctrl-C or SIGTERM reached the launcher too: it passed the signal on and gave the workers 30 s to save
        raise Interrupted(f"stopped by {signal_exception.sigval.name}; {resume_hint(config)}") from None


def _worker(entrypoint: Callable[..., Any], config: Any, *args: Any) -> Any:
    """Runs in each launched process: errors go to the launcher through torchelastic's error file, and on
    screen only with --debug."""
    from torch.distributed.elastic.multiprocessing.errors import get_error_handler

    try:
        return entrypoint(config, *args)
    except Exception as caught:
        error = caught if isinstance(caught, SimmimError) else unexpected(caught) or caught  # a storage fault: 1 line
        get_error_handler().record_exception(error)
        if debug_enabled():
            traceback.print_exc()
        sys.exit(error.exit_code if isinstance(error, SimmimError) else 1)


def _failure_message(failure: Any) -> str:
    data = failure.error_file_data or {}
    message = data.get("message", {})
    if isinstance(message, dict):
        text = message.get("message", "") or failure.message
    else:
        text = str(message) or failure.message
    lines = [line for line in str(text).strip().splitlines() if line.strip()]
    # the error file holds "ErrorType: text" plus the traceback; keep the error line, without our own type names
    line = lines[0] if lines else f"exit code {failure.exitcode}"
    for name in ("SimmimError", "TrainingDiverged", "Interrupted", "StorageError"):
        line = line.removeprefix(f"{name}: ")
    return line


def resume_hint(config: Any) -> str:
    """Where a stopped run's newest checkpoint is, and the option that continues from it."""
    from .checkpoints import latest_checkpoint

    output = getattr(config, "output", None)
    latest = latest_checkpoint(Path(output)) if output else None
    saved = f"newest checkpoint {latest}" if latest else "no checkpoint was saved"
    return f"{saved}; continue with the same command and --resume auto --output {output}"


def any_rank(flag: bool, context: Context) -> bool:
    """True on every rank when ``flag`` is true on any (one small host-side collective)."""
    if not dist.is_initialized():
        return flag
    value = torch.tensor([int(flag)], dtype=torch.int32)
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=context.host_group)
    return bool(value.item())


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sums plain numbers over all ranks (one collective)."""
    if not dist.is_initialized():
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def gather_objects(value: Any) -> list[Any]:
    """Every rank's value, in rank order (on every rank)."""
    if not dist.is_initialized():
        return [value]
    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


GATHER_ROWS = 65_536  # rows per collective: bounds the extra memory of gathering features, ~200 MB at width 768


def gather_rows(tensor: torch.Tensor, context: Context) -> torch.Tensor:
    """Every rank's rows of ``tensor`` (CPU; first dimension may differ between ranks), concatenated in rank
    order, on every rank. Over the host-side gloo group: the rows stay in host memory, none on a GPU."""
    if not dist.is_initialized():
        return tensor
    group = context.host_group
    counts = [torch.zeros(1, dtype=torch.long) for _ in range(context.world_size)]
    dist.all_gather(counts, torch.tensor([len(tensor)]), group=group)
    counts = [int(count) for count in counts]
    if not max(counts):
        return tensor
    padded = tensor.new_zeros((max(counts), *tensor.shape[1:]))
    padded[:len(tensor)] = tensor
    pieces: list[list[torch.Tensor]] = [[] for _ in counts]
    for start in range(0, max(counts), GATHER_ROWS):
        chunk = padded[start:start + GATHER_ROWS].contiguous()
        received = [torch.empty_like(chunk) for _ in counts]
        dist.all_gather(received, chunk, group=group)
        for rank, rows in enumerate(received):
            pieces[rank].append(rows)
    return torch.cat([torch.cat(rows)[:count] for rows, count in zip(pieces, counts, strict=True)])


def check_devices(config: Any) -> None:
    """Fails early, in the launching process, when the GPUs asked for are not there."""
    if config.gpus or config.device == "cuda":
        if not torch.cuda.is_available():
            raise SimmimError("CUDA was requested (--gpus or --device cuda) but torch sees no GPU; "
                              "use --device cpu (and --nproc N for several CPU processes)")
        if config.gpus > torch.cuda.device_count():
            raise SimmimError(f"--gpus {config.gpus} but this machine has {torch.cuda.device_count()} GPU(s)")


def broadcast_object(value: Any) -> Any:
    """Rank 0's value on every rank."""
    if not dist.is_initialized():
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]
