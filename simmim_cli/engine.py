"""The one training loop, shared by pretrain, finetune and linear-probe.

A task owns the model and says how to compute the loss of a batch; the engine does everything else: device
and precision, optimizer and schedule, gradient accumulation and clipping, non-finite steps, DDP, logging,
progress, checkpoints and resuming.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import signal
import sys
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from . import checkpoints, distributed
from .config import TrainConfig
from .errors import Interrupted, SimmimError, TrainingDiverged
from .models import set_fused_attention
from .optim import build_scheduler, lr_scale_for_batch

MAX_NONFINITE_IN_A_ROW = 25  # fp16 loss scaling may skip a few steps at the start; 25 in a row is divergence


class Task:
    """What a training command trains and how; the engine calls these hooks. Subclasses set ``kind`` and
    ``model`` and implement :meth:`build_optimizer` and :meth:`training_step`; the other hooks do nothing."""

    kind: str
    model: nn.Module

    def build_optimizer(self, lr: float) -> torch.optim.Optimizer:
        raise NotImplementedError

    def training_step(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Returns at least ``{"loss": scalar}``; ``model`` is the (compiled, DDP-wrapped) training module."""
        raise NotImplementedError

    def observe_batch(self, batch: dict[str, Any]) -> None:
        """Sees each training batch on the CPU (e.g. to keep a few images for previews)."""

    def after_optimizer_step(self, step: int) -> None:
        """After each optimizer step, on every rank (e.g. to update an EMA of the weights)."""

    def after_checkpoint(self, output: Path, step: int) -> dict[str, float]:
        """Rank-0 work after a checkpoint (previews); returns figures to log."""
        return {}

    def after_epoch(self, output: Path, epoch: int, step: int) -> dict[str, float]:
        """At each epoch's end, on every rank (evaluation); returns figures to log."""
        return {}

    def set_grad_checkpointing(self) -> None:
        """Recompute activations in the backward pass to save memory."""
        self.model.set_grad_checkpointing(True)

    def extra_state(self) -> dict[str, Any]:
        """More to save in checkpoints (plain values and tensors only)."""
        return {}

    def load_extra_state(self, checkpoint: dict[str, Any]) -> None:
        """Takes back what :meth:`extra_state` saved."""


# ---------------------------------------------------------------------------------------------- precision


def cpu_supports_bf16() -> bool:
    """bf16 matrix instructions (AVX512-BF16 or AMX) make bf16 autocast worth it on a CPU."""
    return bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
                or getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` → bf16 where the device has it (recent GPUs, CPUs with bf16 instructions), fp16 on older GPUs,
    fp32 on other CPUs."""
    if precision != "auto":
        if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise SimmimError("this GPU has no bf16; use --precision fp16 (with loss scaling) or fp32")
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_supports_bf16() else "fp32"


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


# ---------------------------------------------------------------------------------------------- run folder


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
        if not Path(config.resume).is_file():
            raise SimmimError(f"--resume {config.resume}: no such checkpoint; use --resume auto to take the newest")
        config.output = config.output or str(Path(config.resume).parent)
    if config.output is None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        config.output = str(runs_root / f"{config.command}-{stamp}")
    output = Path(config.output)
    if output.exists() and not output.is_dir():
        raise SimmimError(f"--output {output} is a file; give a folder")
    if config.resume is None and output.is_dir():
        previous = checkpoints.list_checkpoints(output) + list(output.glob("metrics.jsonl"))
        if previous and not config.force:
            raise SimmimError(f"{output} already holds a run ({previous[-1].name}); continue it with --resume auto, "
                              "or pass --force to start over in it, or choose another --output")
        for path in previous + list(output.glob("preview-*.png")):
            path.unlink()


# ---------------------------------------------------------------------------------------------- progress


class Reporter:
    """Rank-0 output: a rich progress bar on a terminal, plain lines otherwise (SLURM logs, pipes)."""

    def __init__(self, enabled: bool, total_steps: int, start_step: int):
        from rich.console import Console

        self.enabled = enabled
        self.console = Console(stderr=False)
        self.progress = None
        if enabled and self.console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[stats]}"), TimeRemainingColumn(), console=self.console,
            )
            self.task_id = self.progress.add_task("train", total=total_steps, completed=start_step, stats="")
            self.progress.start()

    def print(self, message: str) -> None:
        if not self.enabled:
            return
        if self.progress is not None:
            self.progress.console.print(message, markup=False, highlight=False)
        else:
            print(message, flush=True)

    def update(self, step: int, stats: str, line: str | None = None) -> None:
        if not self.enabled:
            return
        if self.progress is not None:
            self.progress.update(self.task_id, completed=step, stats=stats)
        elif line is not None:
            print(line, flush=True)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


# ---------------------------------------------------------------------------------------------- the loop


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    nonfinite_steps: int = 0
    nonfinite_in_a_row: int = 0
    skipped_samples: int = 0
    last_saved_step: int = -1


class Trainer:
    """Trains ``task.model`` on a :class:`~simmim_cli.data.ShardStream` (or anything with ``set_epoch``,
    ``batches_per_epoch`` and ``batch_size``) as ``config`` says."""

    def __init__(self, task: Task, config: TrainConfig, context: distributed.Context):
        self.task = task
        self.config = config
        self.context = context
        self.device = context.device
        self.output = Path(config.output)
        self.precision = resolve_precision(config.precision, self.device)
        self.stop_requested = False
        if self.device.type == "cuda":
            torch.set_float32_matmul_precision("high")  # TF32 for whatever runs in fp32 (Ampere and newer)
            torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick its fastest kernels

    # -- setup ------------------------------------------------------------------------------------

    def _wrap(self, model: nn.Module) -> nn.Module:
        train_model = model
        if self.config.compile:
            train_model = torch.compile(train_model)
        if self.context.distributed:
            # The head's 1×1 conv gets gradients whose strides differ from the bucket's only on size-1 axes:
            # the same memory layout, so DDP's warning about it is a false alarm.
            warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            # gradients live in the all-reduce buckets: no copy in and out, less memory
            train_model = DistributedDataParallel(train_model, device_ids=device_ids, gradient_as_bucket_view=True)
        return train_model

    def _install_signal_handlers(self) -> dict:
        def request_stop(signum, frame):
            if self.stop_requested:  # a second Ctrl-C stops at once
                raise KeyboardInterrupt
            self.stop_requested = True

        previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread
                previous[sig] = signal.signal(sig, request_stop)
        return previous

    # -- checkpoints ------------------------------------------------------------------------------

    def _state(self, state: TrainState, rng_states: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "kind": self.task.kind,
            "config": self.config.to_dict(),
            "model": self.task.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": state.step,
            "epoch": state.step / self.steps_per_epoch,  # epochs done, fractional mid-epoch
            "world_size": self.context.world_size,
            "nonfinite_steps": state.nonfinite_steps,
            "skipped_samples": state.skipped_samples,
            "rng": rng_states,  # one per rank, so that ranks keep drawing different numbers after a resume
            **self.task.extra_state(),
        }

    def _save(self, state: TrainState, log) -> Path:
        """Every rank calls this at the same step (rank 0 writes, the others wait)."""
        path = self.output / checkpoints.checkpoint_name(state.step)
        if state.last_saved_step == state.step:
            return path
        if state.nonfinite_in_a_row:  # never let a diverging stretch push the last good checkpoint out
            return checkpoints.latest_checkpoint(self.output) or path
        rng_states = distributed.gather_objects(checkpoints.rng_state())
        if self.context.is_main:
            checkpoints.save_checkpoint(self._state(state, rng_states), path)
            checkpoints.prune_checkpoints(self.output, self.config.keep)
            figures = self.task.after_checkpoint(self.output, state.step) or {}
            if figures:
                log({"step": state.step, "epoch": round(state.step / self.steps_per_epoch, 4), **figures})
        distributed.barrier()
        state.last_saved_step = state.step
        return path

    def _restore(self, path: Path, state: TrainState, reporter: Reporter) -> None:
        checkpoint = checkpoints.load_checkpoint(path, map_location="cpu")
        if checkpoint.get("kind") != self.task.kind:
            raise SimmimError(f"{path} is a {checkpoint.get('kind', 'foreign')} checkpoint, "
                              f"it cannot resume a {self.task.kind} run")
        try:
            self.task.model.load_state_dict(checkpoint["model"])
        except RuntimeError as error:
            raise SimmimError(f"{path} does not fit this model (--model {self.config.model}, --img-size "
                              f"{self.config.img_size}): {str(error).splitlines()[1].strip()}") from error
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.task.load_extra_state(checkpoint)
        self.scaler.load_state_dict(checkpoint["scaler"])
        state.step = state.last_saved_step = checkpoint["step"]
        state.nonfinite_steps = checkpoint.get("nonfinite_steps", 0)
        state.skipped_samples = checkpoint.get("skipped_samples", 0)
        if checkpoint.get("world_size", 1) == self.context.world_size:
            checkpoints.set_rng_state(checkpoint["rng"][self.context.rank])
        else:
            torch.manual_seed(self.config.seed + 1000 * state.step + self.context.rank)
            reporter.print(f"note: {path.name} was written by {checkpoint.get('world_size')} process(es), this run "
                           f"has {self.context.world_size}: the global batch and so the learning rate change with "
                           "the process count, the rest of the epoch is dealt out anew (some of its samples are seen "
                           "twice or not at all), and the random streams restart")
        reporter.print(f"resumed from {path} at step {state.step}")

    # -- training ---------------------------------------------------------------------------------

    def fit(self, dataset: Any, max_steps: int | None = None) -> TrainState:
        """Trains until ``config.epochs`` are done (or ``max_steps`` optimizer steps, schedule unchanged)."""
        from .data import make_loader

        config, context = self.config, self.context
        model = self.task.model.to(self.device)
        set_fused_attention(model, self.device.type == "cuda" or self.precision == "fp32")
        if config.grad_checkpointing:
            self.task.set_grad_checkpointing()
        global_batch = dataset.batch_size * context.world_size * config.grad_accum
        lr_factor = lr_scale_for_batch(global_batch)
        self.optimizer = self.task.build_optimizer(config.base_lr * lr_factor)
        self.steps_per_epoch = steps_per_epoch = dataset.batches_per_epoch // config.grad_accum
        if steps_per_epoch < 1:
            raise SimmimError(f"an epoch has {dataset.batches_per_epoch} batches per process, fewer than "
                              f"--grad-accum {config.grad_accum}; lower --grad-accum or --batch-size")
        total_steps = steps_per_epoch * config.epochs
        scheduler = build_scheduler(
            self.optimizer, config.schedule, total_steps, int(config.warmup_epochs * steps_per_epoch),
            config.warmup_lr * lr_factor, config.min_lr * lr_factor,
            [m * steps_per_epoch for m in config.lr_milestones],
        )
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        train_model = self._wrap(model)
        state = TrainState()
        reporter = Reporter(context.is_main, total_steps, 0)
        log = self._logger()
        if context.is_main:
            self.output.mkdir(parents=True, exist_ok=True)
            (self.output / "config.yaml").write_text(config.to_yaml())
        if config.resume:
            self._restore(Path(config.resume), state, reporter)
            if context.is_main:
                self._truncate_metrics(state.step)
        reporter.update(state.step, "")
        parameters = [p for p in model.parameters() if p.requires_grad]
        count = sum(p.numel() for p in parameters)
        reporter.print(
            f"{self.task.kind}: {config.model} ({f'{count / 1e6:.1f}M' if count >= 1e5 else f'{count:,}'} trainable "
            f"parameters) on {context.world_size}× {self.device.type}, precision {self.precision}\n"
            f"batch {dataset.batch_size} per process × {context.world_size} process(es) × {config.grad_accum} "
            f"accumulation = {global_batch} images per step; lr = {config.base_lr:g} × {global_batch}/512 = "
            f"{config.base_lr * lr_factor:.3g}; {steps_per_epoch} steps per epoch, {total_steps} in all\n"
            + (f"process group: {torch.distributed.get_backend()}, {context.world_size} ranks, collectives time out "
               f"after {config.dist_timeout:g} min\n" if context.distributed else "")
            + f"output: {self.output}"
        )
        loader = make_loader(dataset, pin_memory=self.device.type == "cuda")
        previous_handlers = self._install_signal_handlers()
        stop_at = min(total_steps, max_steps) if max_steps else total_steps
        window = _Window(self.device)
        try:
            while state.step < stop_at:
                epoch, offset = divmod(state.step, steps_per_epoch)
                dataset.set_epoch(epoch, skip_batches=offset * config.grad_accum)
                self._train_epoch(train_model, loader, parameters, scheduler, state, window, epoch,
                                  min(stop_at, (epoch + 1) * steps_per_epoch), reporter, log)
                if state.step % steps_per_epoch == 0:  # a whole epoch: evaluate (all ranks), then save
                    figures = self.task.after_epoch(self.output, state.step // steps_per_epoch, state.step)
                    if figures:
                        log({"step": state.step, "epoch": state.step // steps_per_epoch, **figures})
                        reporter.print(f"epoch {state.step // steps_per_epoch}: "
                                       + "  ".join(f"{k} {v:.4g}" for k, v in figures.items()))
                self._save(state, log)  # at every epoch's end, and where max_steps stops
        finally:
            reporter.close()
            for sig, handler in previous_handlers.items():
                signal.signal(sig, handler)
        return state

    def _train_epoch(self, train_model, loader, parameters, scheduler, state, window, epoch, end_step,
                     reporter, log) -> None:
        config, accum = self.config, self.config.grad_accum
        train_model.train()
        micro = 0
        batches: Iterable = iter(loader)
        while state.step < end_step:
            batch = next(batches)
            state.skipped_samples += self._report_skipped(batch, reporter)
            self.task.observe_batch(batch)
            batch = {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
            micro += 1
            last_micro = micro % accum == 0
            no_sync = train_model.no_sync() if self.context.distributed and not last_micro else contextlib.nullcontext()
            with no_sync:
                with autocast(self.precision, self.device):
                    outputs = self.task.training_step(train_model, batch)
                loss = outputs["loss"]
                self.scaler.scale(loss / accum).backward()
            window.add(loss.detach(), len(batch["label"] if "label" in batch else batch["image"]))
            if not last_micro:
                continue

            scheduler.step_update(state.step)
            self.scaler.unscale_(self.optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(parameters, config.clip_grad or math.inf)
            # the one host-device sync of a step; the norm is all-reduced, so every rank decides alike
            finite = bool(torch.isfinite(grad_norm))
            if finite:
                self.scaler.step(self.optimizer)
                self.task.after_optimizer_step(state.step + 1)
                state.nonfinite_in_a_row = 0
            else:
                state.nonfinite_steps += 1
                state.nonfinite_in_a_row += 1
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            state.step += 1
            window.grad_norm = grad_norm.detach()
            if state.nonfinite_in_a_row >= MAX_NONFINITE_IN_A_ROW:
                last = checkpoints.latest_checkpoint(self.output)
                raise TrainingDiverged(
                    f"loss or gradients were not finite for {MAX_NONFINITE_IN_A_ROW} steps in a row (step "
                    f"{state.step}); last good checkpoint: {last or 'none yet'}; try --precision bf16 or fp32, a lower "
                    "--base-lr or a longer --warmup-epochs")

            log_step = state.step % config.log_every == 0 or state.step == end_step
            if log_step:
                self._log_window(state, window, epoch, reporter, log)
                if self.context.distributed:  # ranks agree on a stop request (one small collective per log line)
                    self.stop_requested = distributed.all_reduce_sum([float(self.stop_requested)], self.device)[0] > 0
            if config.save_every and state.step % config.save_every == 0:
                self._save(state, log)
            if self.stop_requested and (log_step or not self.context.distributed):
                path = self._save(state, log)
                raise Interrupted(f"stopped at step {state.step}; saved {path}; continue with the same command "
                                  f"and --resume auto --output {self.output}")

    def _report_skipped(self, batch: dict[str, Any], reporter: Reporter) -> int:
        skipped = batch.pop("skipped", [])
        for description in skipped[:5]:
            reporter.print(f"warning: skipped a bad sample: {description}")
        return len(skipped)

    def _log_window(self, state, window, epoch, reporter, log) -> None:
        loss_sum, count, images, seconds = window.flush()
        totals = distributed.all_reduce_sum(
            [loss_sum, count, images, float(state.skipped_samples)], self.device)
        loss = totals[0] / max(totals[1], 1)
        images_per_second = totals[2] / max(seconds, 1e-9)
        lr = max(group["lr"] for group in self.optimizer.param_groups)
        row = {
            "step": state.step, "epoch": round(state.step / self.steps_per_epoch, 4), "loss": loss, "lr": lr,
            "img_per_s": round(images_per_second, 2), "grad_norm": window.last_grad_norm(),
            "skipped_samples": int(totals[3]), "nonfinite_steps": state.nonfinite_steps,
        }
        log(row)
        stats = f"loss {loss:.4f}  lr {lr:.2e}  {images_per_second:.1f} img/s"
        reporter.update(state.step, stats, f"epoch {epoch + 1}/{self.config.epochs}  step {state.step}  {stats}"
                        + (f"  skipped samples {row['skipped_samples']}" if row["skipped_samples"] else ""))

    def _logger(self):
        path = self.output / "metrics.jsonl"

        def log(row: dict[str, Any]) -> None:
            if self.context.is_main:
                with path.open("a") as file:
                    file.write(json.dumps({**row, "time": round(time.time(), 3)}) + "\n")

        return log

    def _truncate_metrics(self, step: int) -> None:
        """Drops rows a crashed run logged after its last checkpoint, so the resumed run does not repeat them."""
        path = self.output / "metrics.jsonl"
        if path.is_file():
            rows = [line for line in path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= step]
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(row + "\n" for row in rows))
            shutil.move(tmp, path)


class _Window:
    """Loss and throughput since the last log line, kept on the device until it is printed."""

    def __init__(self, device: torch.device):
        self.device = device
        self.grad_norm: torch.Tensor | None = None
        self._reset()

    def _reset(self) -> None:
        self.loss_sum = torch.zeros((), device=self.device)
        self.count = 0
        self.images = 0
        self.started = time.perf_counter()

    def add(self, loss: torch.Tensor, images: int) -> None:
        self.loss_sum += loss.float()
        self.count += 1
        self.images += images

    def flush(self) -> tuple[float, int, int, float]:
        result = (float(self.loss_sum), self.count, self.images, time.perf_counter() - self.started)
        self._reset()
        return result

    def last_grad_norm(self) -> float | None:
        return round(float(self.grad_norm), 4) if self.grad_norm is not None else None
