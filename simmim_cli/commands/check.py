"""``simmim check pretrain|finetune|linear-probe ...``: will this run work, how fast, and what holds it back.

The check takes the command's own config, prepares it with the command's own ``prepare`` and ``build`` (into a
temporary folder: the run folder is only read), starts the same processes through the same launcher, and in
each of them runs the engine's own steps (:meth:`Trainer.setup`, :meth:`~Trainer.prepare_model`,
:meth:`~Trainer.train_step`, :meth:`~Trainer.optimizer_step`) on batches from the real loader. What it measures
and concludes is in ``preflight.py``; this module only runs things and times them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import itertools
import json
import math
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

from .. import checkpoints, distributed, memory_plan, mixture, preflight
from ..config import TrainConfig
from ..data_sources import is_image_folder
from ..engine import Trainer
from ..errors import SimmimError
from ..pipeline import default_workers, make_loader, too_few_shards
from ..redact import redact_values, terminal
from ..shards import write_shards
from .check_data import time_data
from .finetune import build_finetune, prepare_finetune
from .pretrain import build_pretrain, prepare_pretrain
from .probe import build_linear_probe, prepare_linear_probe
from .training import check_resume_exists, foreign_files

COMMANDS = {
    "pretrain": (prepare_pretrain, build_pretrain),
    "finetune": (prepare_finetune, build_finetune),
    "linear-probe": (prepare_linear_probe, build_linear_probe),
}
# untimed steps first: DDP's buckets, cuDNN's kernel choice, the allocator's first blocks, and on the CPU the memory
# that the peak-memory reset handed back to the kernel, faulted in again
WARMUP_STEPS = 2
TIMED_SECONDS = 5.0  # without --steps, timed steps go on for about this long
MIN_TIMED_STEPS, MAX_TIMED_STEPS = 10, 500  # the median of fewer steps is one slow step away from another figure
FIND_BATCH_TRIALS = 16  # doublings and bisections together
FIND_BATCH_SECONDS = 60.0  # --find-batch stops doubling after this long and reports "at least"
FIND_BATCH_FACTOR = 64  # ... or at this many times the requested batch (a CPU's memory is large and slow to fill)


@dataclass
class CheckOptions:
    """The check's own options (``simmim check [OPTIONS] COMMAND ...``)."""

    json: bool = False
    output: str | None = None  # a folder for check.json and check.txt
    find_batch: bool = False
    steps: int | None = None  # timed optimizer steps per process after WARMUP_STEPS; None: TIMED_SECONDS' worth
    forecast_gpus: list[int] = dataclasses.field(default_factory=list)  # more GPU counts for the memory forecast


def check(command: str, config: TrainConfig, options: CheckOptions) -> int:
    """Runs the check, prints the table (or JSON), returns the exit code: 0 when the run will work, 1 when it
    will not start or not fit."""
    if options.steps is not None and options.steps < 1:
        raise SimmimError(f"--steps must be at least 1, got {options.steps}")
    report_folder = _report_folder(options.output, config)
    started = time.perf_counter()
    run_problems = _run_folder_problems(config)
    prepare, _ = COMMANDS[command]
    with tempfile.TemporaryDirectory(prefix="simmim-check-") as scratch:
        # the scratch folder is the check's own (its data shards may sit there): the run is written into it
        config.output, config.resume, config.force, config.log_to = scratch, None, True, []
        if distributed.launched_env(config) is not None:  # one process of torchrun/SLURM
            report = _check_process(config, command, options, prepare_here=True)
        else:
            _prepare(prepare, config, scratch)
            report = (distributed.launch(_check_process, config, command, options, False)
                      if distributed.needs_launch(config) else _check_process(config, command, options, False))
    if report is None:  # a process of torchrun/SLURM other than the first of its node
        return 0
    report["problems"] = run_problems + report["problems"]
    report["seconds"] = round(time.perf_counter() - started, 1)
    report["verdict"]["ok"] = report["verdict"]["ok"] and not run_problems
    report = redact_values(report)  # locations and messages of the data, shown and stored without credentials
    text = preflight.render(report)
    print(json.dumps(report, indent=2) if options.json else terminal(text), flush=True)  # sample names escaped
    if report_folder is not None:
        report_folder.mkdir(parents=True, exist_ok=True)
        (report_folder / "check.json").write_text(json.dumps(report, indent=2) + "\n")
        (report_folder / "check.txt").write_text(text + "\n")
    return 0 if report["verdict"]["ok"] else 1


def _report_folder(output: str | None, config: TrainConfig) -> Path | None:
    if output is None:
        return None
    folder = Path(output)
    holds_run = folder.is_dir() and (checkpoints.list_checkpoints(folder) or (folder / "metrics.jsonl").exists())
    if holds_run or (config.output and folder.resolve() == Path(config.output).resolve()):
        raise SimmimError(f"simmim check --output {output} is a run folder; the check never writes into one: "
                          "give another folder for check.json")
    if folder.exists() and not folder.is_dir():
        raise SimmimError(f"simmim check --output {output} is a file; give a folder")
    return folder


def _run_folder_problems(config: TrainConfig) -> list[str]:
    """What the real command would refuse about its run folder, found by reading it only."""
    check_resume_exists(config)
    if not config.output or config.resume or config.force:
        return []
    output = Path(config.output)
    if output.exists() and not output.is_dir():
        raise SimmimError(f"--output {output} is a file; give a folder")
    previous = checkpoints.list_checkpoints(output) + list(output.glob("metrics.jsonl")) if output.is_dir() else []
    if previous:
        return [f"{output} already holds a run ({previous[-1].name}): the command would refuse to start; add "
                "--resume auto to continue it or --force to start over, or choose another --output"]
    if output.is_dir() and foreign_files(output):
        return [f"{output} holds files but no simmim run: the command would refuse to start; give a new or empty "
                "--output, or --force to write the run into it"]
    return []


def _prepare(prepare, config: TrainConfig, scratch: str) -> None:
    """The command's own checks and choices, with its summary on stderr; image folders are read through shards
    written into the temporary folder (the real run writes them once next to the folder)."""
    written = itertools.count()

    def in_scratch(value: str, name: str) -> str:
        if not is_image_folder(Path(value)):
            return value
        target = Path(scratch) / f"{name}-shards-{next(written)}"
        with contextlib.redirect_stdout(sys.stderr):
            write_shards(Path(value), target, maxcount=1000, force=True)
        return str(target)

    for name in ("data", "val_data", "knn_data", "knn_val_data"):
        value = getattr(config, name, None)
        if value and name == "data":  # --data may name several sources, each with its share
            config.data = mixture.map_paths(value, functools.partial(in_scratch, name=name))
        elif value:
            setattr(config, name, in_scratch(value, name))
    if getattr(config, "cache_features", False):
        config.cache_dir = str(Path(scratch) / "features")
    with contextlib.redirect_stdout(sys.stderr):
        prepare(config)


# ---------------------------------------------------------------------------------------------- one process


def _check_process(config: TrainConfig, command: str, options: CheckOptions, prepare_here: bool) -> dict | None:
    """In every process of the job: the real setup, a timed read of the data (rank 0), real steps, the
    all-reduce; rank 0 gathers the figures and every node's first process gets the report."""
    prepare, build = COMMANDS[command]
    context = distributed.setup(config)
    trainer = None
    try:
        if prepare_here and context.is_main:
            _prepare(prepare, config, config.output)
        config = distributed.broadcast_object(config)
        if config.workers is None:
            config.workers = default_workers(context.local_world_size)
        torch.manual_seed(config.seed)
        with contextlib.redirect_stdout(io.StringIO()):  # the run's start-up lines are not the check's output
            task, dataset = build(config, context)
            torch.manual_seed(config.seed + context.rank)
            trainer = Trainer(task, config, context)
            trainer.setup(dataset)
        data = time_data(dataset) if context.is_main else None
        distributed.barrier()
        with contextlib.redirect_stdout(sys.stderr):  # the engine's notes (e.g. skipped samples) stay visible
            figures = _measure(trainer, dataset, config, options, context)
        # after the steps: importing onnxruntime to list its providers would count in the CPU's peak memory
        env = preflight.environment(config, context.local_world_size, config.workers) if context.is_main else None
        figures.update(rank=context.rank, cores=preflight.usable_cores())
        per_rank = distributed.gather_objects(figures)
        report = (_report(command, config, context, trainer, dataset, env, data, per_rank, options.forecast_gpus)
                  if context.is_main else None)
        report = distributed.broadcast_object(report)
        return report if context.local_rank == 0 else None
    finally:
        if trainer is not None:
            trainer.reporter.close()
            trainer.run_log.close()
        distributed.teardown()


class _Batches:
    """Batches from the real loader on the training device, taken as the run takes them: one pass over the loader
    spans the run's ``epochs``, so its processes start once and keep their batches coming across an epoch's end.
    Waiting for a batch is timed; the loader's start is timed apart (``starts``), and so is a start again where
    the check outlasts the run's epochs."""

    def __init__(self, dataset: Any, device: torch.device, epochs: int):
        self.dataset, self.device, self.epochs = dataset, device, max(epochs, 1)
        self.loader = make_loader(dataset, pin_memory=device.type == "cuda")
        self.epoch, self.starts = 0, []
        self._start()

    def _start(self) -> None:
        self.dataset.set_epoch(self.epoch, epochs=self.epochs)
        started = time.perf_counter()
        self.iterator = iter(self.loader)
        self.pending = next(self.iterator)
        self.starts.append(time.perf_counter() - started)

    def next(self) -> tuple[dict[str, Any], float]:
        """(batch, seconds waited for it)."""
        started = time.perf_counter()
        if self.pending is None:
            try:
                batch = next(self.iterator)
            except StopIteration:
                self.epoch += self.epochs
                self._start()
                return self.next()
        else:
            batch, self.pending = self.pending, None
        batch = {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        return batch, time.perf_counter() - started

    def close(self) -> None:
        self.iterator = None  # the loader's workers end with their iterator


def _measure(trainer: Trainer, dataset: Any, config: TrainConfig, options: CheckOptions,
             context: distributed.Context) -> dict[str, Any]:
    """Memory of a step at the requested batch (each process alone), then timed steps of all processes
    together, the all-reduce, and what --find-batch or a failed fit asks for."""
    device = trainer.device
    memory = preflight.PeakMemory(device)
    cap = preflight.memory_cap()
    batches = _Batches(dataset, device, config.epochs)
    figures: dict[str, Any] = {"device": device.type, "device_memory": memory.total()}
    try:
        first, _ = batches.next()
        trainer.task.model.train()
        trainer.prepare_model(first)  # FLOPs per image, frozen unused parameters, compile and DDP
        figures["flops_per_image"] = trainer.flops_per_image
        figures["peak_flops"] = trainer.peak_flops
        fits, figures["probe_peak"] = _probe(trainer, first, memory, cap, steps=2)
        fits = not distributed.any_rank(not fits, context)
        figures["fits"] = fits
        if fits:
            figures.update(_timed_steps(trainer, batches, config, options.steps, memory))
            if context.distributed:
                dtype = torch.bfloat16 if config.bf16_grad_reduce else torch.float32
                numel = sum(p.numel() for p in trainer.parameters)
                figures["allreduce"] = preflight.bus_bandwidth(numel, dtype, device)
            started = time.perf_counter()
            trainer.save()  # the engine's own checkpoint and previews, into the temporary folder
            figures["save_s"] = time.perf_counter() - started
        figures["epoch_start_s"] = statistics.median(batches.starts)
        figures.update(memory_plan.process_figures(trainer, first))
        if options.find_batch or not fits:
            figures["find_batch"] = _find_batch(trainer, first, memory, cap, context, config.batch_size)
        if not fits and not config.grad_checkpointing and trainer.task.kind != "linear-probe":
            trainer.task.set_grad_checkpointing()
            ok, peak = _probe(trainer, first, memory, cap, steps=1)
            figures["grad_checkpointing"] = {"fits": not distributed.any_rank(not ok, context), "peak": peak}
    finally:
        batches.close()
    return figures


def _local_model(trainer: Trainer) -> torch.nn.Module:
    """The training module without DDP: memory probes run on each process alone, so that one process running
    out of memory does not leave the others waiting in an all-reduce."""
    model = trainer.train_model
    return model.module if isinstance(model, DistributedDataParallel) else model


def _probe(trainer: Trainer, batch: dict[str, Any], memory: preflight.PeakMemory, cap: int | None,
           steps: int) -> tuple[bool, int | None]:
    """(fits, peak bytes of the last step) for ``steps`` real training steps on ``batch`` in this process; running
    out of memory (on a GPU, or above the memory cap) is an answer, not an error."""
    wrapped, trainer.train_model = trainer.train_model, _local_model(trainer)
    peak, out_of_memory = None, False
    try:
        for _ in range(steps):
            memory.reset()
            trainer.train_step(batch, last_micro=True)
            trainer.optimizer_step()
            peak = memory.read()
    except (torch.cuda.OutOfMemoryError, RuntimeError) as error:
        if not preflight.is_out_of_memory(error):
            raise
        out_of_memory = True
    finally:
        trainer.train_model = wrapped
    if out_of_memory:  # outside the except block: its traceback no longer holds the step's tensors
        trainer.optimizer.zero_grad(set_to_none=True)
        if trainer.scaler.is_enabled():  # an interrupted step may have left the scaler half-way (unscaled)
            trainer.scaler = type(trainer.scaler)(trainer.device.type, init_scale=trainer.scaler.get_scale())
        preflight.free_memory(trainer.device)
        return False, None
    return (cap is None or peak <= cap), peak


def _timed_steps(trainer: Trainer, batches: _Batches, config: TrainConfig, steps: int | None,
                 memory: preflight.PeakMemory) -> dict[str, Any]:
    """Optimizer steps as the run makes them (DDP, gradient accumulation, real batches), each synchronised:
    the time waiting for batches and the time computing, per step. ``steps`` None: as many as fill about
    TIMED_SECONDS, at least MIN_TIMED_STEPS.

    A step computes for the median of the timed steps' compute times, so that one step slowed by something else
    (a garbage collection, another job's burst on a shared machine) does not speak for all; it waits for data the
    mean of their waits, since a loader slower than the model makes some steps wait and not others."""
    waits, computes = [], []
    memory.reset()  # before the warm-up: the memory it hands back to the kernel is faulted in by an untimed step
    index, last = 0, WARMUP_STEPS + 1  # the count is fixed after the warm-up
    warm_started = time.perf_counter()
    while index < last:
        if index == WARMUP_STEPS:
            # enough steps for TIMED_SECONDS at the slowest process's pace: every process makes the same number
            pace = max(distributed.gather_objects(time.perf_counter() - warm_started)) / WARMUP_STEPS
            wanted = steps or min(max(MIN_TIMED_STEPS, math.ceil(TIMED_SECONDS / max(pace, 1e-6))), MAX_TIMED_STEPS)
            last = WARMUP_STEPS + wanted
        started, waited, starts = time.perf_counter(), 0.0, len(batches.starts)
        for micro in range(config.grad_accum):
            batch, wait = batches.next()
            waited += wait
            trainer.train_step(batch, last_micro=micro == config.grad_accum - 1)
        trainer.optimizer_step()
        preflight.synchronize(trainer.device)
        if index >= WARMUP_STEPS:
            restarted = sum(batches.starts[starts:])  # the loader started again: a cost of the check, not the step's
            waits.append(waited)
            computes.append(time.perf_counter() - started - waited - restarted)
        index += 1
    compute, wait = statistics.median(computes), statistics.fmean(waits)
    loop = compute + wait
    return {"steps": len(computes), "compute_step_s": compute, "loop_step_s": loop, "data_wait": wait / loop,
            "img_per_s": config.batch_size * config.grad_accum / loop, "peak_memory": memory.read()}


def _tile(batch: dict[str, Any], size: int) -> dict[str, Any]:
    """A batch of ``size`` made of the real batch's samples, repeated as needed."""
    tiled = {}
    for key, value in batch.items():
        if torch.is_tensor(value) and value.dim() > 0:
            tiled[key] = value.repeat(math.ceil(size / len(value)), *[1] * (value.dim() - 1))[:size]
    return tiled


def _find_batch(trainer: Trainer, batch: dict[str, Any], memory: preflight.PeakMemory, cap: int | None,
                context: distributed.Context, requested: int) -> dict[str, Any]:
    """The largest batch per process that fits, with real steps: doubling from the requested batch (halving
    when it does not fit), then bisecting between the last that fit and the first that did not (to 1/16)."""
    trials: list[tuple[int, bool, int | None]] = []
    deadline = time.perf_counter() + FIND_BATCH_SECONDS

    def fits(size: int) -> bool:
        ok, peak = _probe(trainer, _tile(batch, size), memory, cap, steps=1)
        ok = not distributed.any_rank(not ok, context)
        trials.append((size, ok, peak))
        return ok

    good, bad = 0, None
    size = requested
    if fits(size):
        good = size
        while (len(trials) < FIND_BATCH_TRIALS and time.perf_counter() < deadline
               and size * 2 <= requested * FIND_BATCH_FACTOR):
            size *= 2
            if not fits(size):
                bad = size
                break
            good = size
    else:
        bad = size
        while size > 1:
            size //= 2
            if fits(size):
                good = size
                break
            bad = size
    while bad is not None and good and bad - good > max(1, good // 16) and len(trials) < 2 * FIND_BATCH_TRIALS:
        middle = (good + bad) // 2
        if fits(middle):
            good = middle
        else:
            bad = middle
    return {"largest": good, "first_failing": bad, "trials": trials}


# ---------------------------------------------------------------------------------------------- the report


def _report(command: str, config: TrainConfig, context: distributed.Context, trainer: Trainer, dataset: Any,
            env: tuple[dict[str, Any], list[str]], data: dict[str, Any], per_rank: list[dict[str, Any]],
            forecast_gpus: list[int]) -> dict:
    """Rank 0: the figures of every process, the forecast and the verdict, as one JSON-able object."""
    facts, problems = env
    problems = list(problems)
    first = per_rank[0]
    fits = all(r["fits"] for r in per_rank)
    flops, peak_flops = first["flops_per_image"], first["peak_flops"]
    processes = []
    for r in per_rank:
        row = {"rank": r["rank"], "device": r["device"], "cores": r["cores"],
               "peak_memory": r.get("peak_memory") or r["probe_peak"], "device_memory": r["device_memory"],
               "fits": r["fits"]}
        if "img_per_s" in r:
            row.update({k: r[k] for k in ("img_per_s", "compute_step_s", "loop_step_s", "data_wait")})
            # the peak never below the rate achieved: a CPU's is timed, maybe while other jobs loaded it
            row["mfu"] = (flops * r["img_per_s"] / max(peak_flops, flops * r["img_per_s"]) if flops and peak_flops
                          else None)
        processes.append(row)
        if row["device_memory"] and row["peak_memory"] and row["peak_memory"] > 0.95 * row["device_memory"]:
            problems.append(f"rank {r['rank']} peaks at {preflight.size(row['peak_memory'])} of "
                            f"{preflight.size(row['device_memory'])}: little headroom; lower --batch-size or add "
                            "--grad-checkpointing")
    shards, consumers = data.get("shards"), data.get("consumers")
    shortage = too_few_shards(shards, context.world_size, config.workers, data.get("samples")) if shards else None
    if shortage and consumers:
        problems.append(shortage)
    if data.get("unreadable_count"):
        problems.append(f"{data['unreadable_count']} unreadable sample(s) among those read (first: "
                        f"{data['unreadable'][0]}); training skips them; re-create the shards to drop them")
    total_steps = min(trainer.total_steps, config.max_steps) if config.max_steps else trainer.total_steps
    run = {"world_size": context.world_size, "batch_size": config.batch_size, "grad_accum": config.grad_accum,
           "global_batch": config.batch_size * config.grad_accum * context.world_size,
           "workers": config.workers, "precision": trainer.precision, "model": config.model,
           "parameters": sum(p.numel() for p in trainer.parameters), "flops_per_image": flops,
           "steps_per_epoch": trainer.steps_per_epoch, "total_steps": total_steps, "epochs": config.epochs,
           "evaluates": bool(getattr(config, "val_data", None))}
    allreduce = max((r["allreduce"] for r in per_rank if "allreduce" in r), key=lambda a: a["seconds"],
                    default=None)
    find = first.get("find_batch")
    memory = {"requested_fits": fits, "peak_memory": max((p["peak_memory"] or 0) for p in processes),
              "largest_batch": find["largest"] if find else None,
              "first_failing_batch": find["first_failing"] if find else None,
              "grad_checkpointing_fits": first.get("grad_checkpointing", {}).get("fits"), "cap": preflight.memory_cap()}
    plan = memory_plan.from_check(per_rank, run["parameters"], context.world_size, context.local_world_size,
                                  trainer.sharded, config.grad_checkpointing, config.grad_accum, trainer.precision,
                                  config.bf16_grad_reduce,
                                  allreduce["busbw_gbps"] if allreduce else None, forecast_gpus)
    comm_s = plan["communication"]["total_s"] if trainer.sharded and "communication" in plan else None
    forecast = None
    if fits:
        loader_rate = data.get("img_per_s_per_loader")
        if loader_rate and config.workers:  # parallel loader processes, as many as there are cores for them
            loader_rate *= min(config.workers, facts["cores_per_process"])
        rates = preflight.Rates(
            images_per_step=config.batch_size * config.grad_accum,
            compute_step_s=max(r["compute_step_s"] for r in per_rank),
            loop_step_s=max(r["loop_step_s"] for r in per_rank),
            data_wait=statistics.fmean(r["data_wait"] for r in per_rank), loader_img_s=loader_rate,
            allreduce_s=comm_s or (allreduce["seconds"] if allreduce else None),
            epoch_start_s=max(r["epoch_start_s"] for r in per_rank), save_s=max(r["save_s"] for r in per_rank),
            saves_per_epoch=1 + (trainer.steps_per_epoch // config.save_every if config.save_every else 0),
            steps_per_epoch=trainer.steps_per_epoch, total_steps=total_steps, epochs=config.epochs)
        forecast = preflight.forecast(rates)
        forecast.update(loader_img_s=loader_rate, epoch_start_s=rates.epoch_start_s, save_s=rates.save_s)
        bound = forecast["bound"]
    else:
        bound = "memory"
    hints = {**memory, "cores_per_process": facts["cores_per_process"], "device": first["device"],
             "shards": shards or 0, "consumers": consumers or 0}
    verdict = {"ok": fits, "bound": bound, "advice": [plan["advice"]] * bool(plan["advice"])
               + preflight.advice(bound, config, hints)}
    return {"command": command, "run": run, "environment": facts, "data": data, "processes": processes,
            "allreduce": allreduce, "memory": memory, "memory_plan": plan, "find_batch": find, "forecast": forecast,
            "verdict": verdict, "problems": problems}
