"""The one training loop, shared by pretrain, finetune and linear-probe.

A task (``tasks.py``) owns the model and says what a batch's loss is; the engine does everything else, in
named steps: :meth:`Trainer.setup` (device, precision, sharding, optimizer, schedule, resume),
:meth:`Trainer.run_epoch`, :meth:`Trainer.train_step` (forward and backward of one batch),
:meth:`Trainer.optimizer_step` (clip, step, non-finite checks), :meth:`Trainer.log_window` and :meth:`Trainer.save`.
Whether the model is replicated (DDP) or sharded (``--shard-model``) is ``parallelize.py``'s business.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import checkpoints, distributed, parallelize, storage
from .config import TrainConfig
from .errors import Interrupted, SimmimError, TrainingDiverged
from .flops import count_training_flops, device_peak_flops, meta_copy, raised_peak
from .log_window import LogWindow
from .models import describe_architecture, set_fused_attention
from .optim import build_scheduler, lr_scale_for_batch
from .pipeline import make_loader, too_few_shards
from .plots import BackgroundPlot
from .precision import autocast, emulated_bf16_warning, resolve_precision
from .prefetch import DevicePrefetcher
from .progress import Reporter
from .storage import StorageError
from .summary import seconds_since_start, training_summary
from .tasks import Task
from .tracking import RunLog

FOLLOWER_GRACE_S = 3.0  # the launcher reports the first worker it sees failing; the cause should be that one
MAX_NONFINITE_IN_A_ROW = 25  # fp16 loss scaling may skip a few steps at the start; 25 in a row is divergence
DATA_WAIT_WARNING = 0.1  # share of the time spent waiting for batches above which the GPU is said to starve
REPEATED_SIGNAL_SECONDS = 3.0  # a launcher passes on the terminal's Ctrl-C: the same signal again within this is one


def keep_freed_cpu_memory() -> bool:
    """Asks glibc's malloc to keep the memory a training step frees for the next step, on the CPU.

    By default glibc gives large freed blocks back to the kernel (blocks it mapped on their own at once, the
    heap's top once it is larger than the trim threshold; both thresholds move with what the process did
    before), and the next step page-faults them in again, each page zeroed by the kernel: Swin-T at 192 px,
    batch 16, took ~120,000 minor page faults (~0.5 GB) per step. A fixed mmap threshold at glibc's largest and
    the largest trim threshold keep those blocks in the heap. Returns whether malloc took the settings (glibc
    only; elsewhere nothing changes)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's malloc.h
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(m_mmap_threshold, 32 << 20)) and bool(mallopt(m_trim_threshold, 2**31 - 1))


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    nonfinite_steps: int = 0
    nonfinite_in_a_row: int = 0
    skipped_samples: int = 0
    last_saved_step: int = -1


class Trainer:
    """Trains ``task.model`` on a :class:`~simmim_cli.pipeline.ShardStream` (or anything with ``set_epoch``,
    ``batches_per_epoch`` and ``batch_size``) as ``config`` says."""

    def __init__(self, task: Task, config: TrainConfig, context: distributed.Context):
        self.task = task
        self.config = config
        self.context = context
        self.device = context.device
        self.output = Path(config.output)
        self.precision = resolve_precision(config.precision, self.device)
        self.sharded = config.shard_model and context.distributed  # one process has nothing to shard ...
        self.stop_requested = False
        self.state = TrainState()
        if self.device.type == "cuda":
            torch.set_float32_matmul_precision("high")  # TF32 for whatever runs in fp32 (Ampere and newer)
            torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick its fastest kernels

    # -- the whole run -----------------------------------------------------------------------------

    def fit(self, dataset: Any, max_steps: int | None = None) -> TrainState:
        """Trains until ``config.epochs`` are done (or ``max_steps`` optimizer steps, schedule unchanged)."""
        started = time.time()
        self.setup(dataset, max_steps)
        state, stop_at = self.state, self.stop_at
        # One pass over the loader spans every epoch still to run, so its worker processes start once and keep
        # decoding across each epoch's end (while the task evaluates and the checkpoint is written).
        first_epoch, offset = divmod(state.step, self.steps_per_epoch)
        # a checkpoint's position in the epoch order (resume_consumed) continues it on any cluster shape
        position = {"consumed": self.resume_consumed} if self.resume_consumed is not None else {}
        dataset.set_epoch(first_epoch, skip_batches=offset * self.config.grad_accum,
                          epochs=max(1, -(-stop_at // self.steps_per_epoch) - first_epoch), **position)
        # each epoch yields batches_per_epoch batches; the optimizer steps use a multiple of --grad-accum of them
        unused_per_epoch = dataset.batches_per_epoch - self.steps_per_epoch * self.config.grad_accum
        previous_handlers = self._install_signal_handlers()
        batches = None
        try:
            if state.step < stop_at:  # (a finished run that resumes starts no loader)
                batches = DevicePrefetcher(iter(make_loader(dataset, pin_memory=self.device.type == "cuda")),
                                            self.device, self.window)
            while state.step < stop_at:
                epoch = state.step // self.steps_per_epoch
                self.run_epoch(batches, epoch, min(stop_at, (epoch + 1) * self.steps_per_epoch))
                with self.window.paused():  # evaluation and checkpoints are not training time
                    if state.step % self.steps_per_epoch == 0:
                        self.end_epoch()
                        if state.step < stop_at:
                            for _ in range(unused_per_epoch):
                                next(batches)
                    self.save()  # at every epoch's end, and where max_steps stops
        finally:
            if batches is not None:
                batches.close()
            self.reporter.close()
            self.run_log.close()
            if self.context.is_main and (state.step >= stop_at or self.stop_requested):
                self.plot.request(final=True)  # the whole run's curves, also where a stop request ended it
            self.plot.wait()  # metrics.png complete (and no temporary file) before the process ends
            for sig, handler in previous_handlers.items():
                signal.signal(sig, handler)
        if self.context.is_main:  # what the run did and wrote, and what to run next
            summary = training_summary(self.config, self.output, seconds_since_start(started), state.step,
                                       self.total_steps)
            self.run_log.log_summary(summary.row())
            self.reporter.print(summary.text())
        return state

    # -- setup -------------------------------------------------------------------------------------

    def setup(self, dataset: Any, max_steps: int | None = None) -> None:
        """Model on the device (sharded: its shards), optimizer and schedule for the global batch, the run folder,
        resume; the run stops at ``max_steps`` optimizer steps when given (the schedule unchanged)."""
        config, context = self.config, self.context
        if self.device.type == "cpu":
            keep_freed_cpu_memory()
        model = self.task.model
        self.sharded_modules: list[nn.Module] = []
        self.flops_model: nn.Module | None = None
        if self.sharded:  # before the optimizer: fully_shard replaces the parameters
            self.flops_model = meta_copy(model)  # a sharded model cannot be copied
            self.sharded_modules = self.task.sharded_modules()
            self.mesh = parallelize.shard(self.sharded_modules, self.device, context.world_size,
                                          context.local_world_size, self.precision, config.bf16_grad_reduce)
        else:
            model.to(self.device)
        set_fused_attention(model, self.device.type == "cuda" or self.precision == "fp32")
        if config.grad_checkpointing:
            self.task.set_grad_checkpointing()
        global_batch = self.global_batch = dataset.batch_size * context.world_size * config.grad_accum
        self.dataset = dataset
        self.resume_consumed: list | None = None  # set by _restore: slots of the epoch trained on
        lr_factor = lr_scale_for_batch(global_batch)
        self.optimizer = self.task.build_optimizer(config.base_lr * lr_factor)
        self.steps_per_epoch = dataset.batches_per_epoch // config.grad_accum
        if self.steps_per_epoch < 1:
            raise SimmimError(f"an epoch has {dataset.batches_per_epoch} batches per process, fewer than "
                              f"--grad-accum {config.grad_accum}; lower --grad-accum or --batch-size")
        self.total_steps = self.steps_per_epoch * config.epochs
        self.stop_at = min(self.total_steps, max_steps) if max_steps else self.total_steps
        self.scheduler = build_scheduler(
            self.optimizer, config.schedule, self.total_steps, int(config.warmup_epochs * self.steps_per_epoch),
            config.warmup_lr * lr_factor, config.min_lr * lr_factor,
            [m * self.steps_per_epoch for m in config.lr_milestones],
        )
        self.scaler = parallelize.grad_scaler(self.device, self.precision == "fp16", self.sharded)
        # fused AdamW can skip a non-finite step on the device (no host sync); other optimizers need the host
        self.skips_on_device = getattr(self.optimizer, "_step_supports_amp_scaling", False)
        self.train_model: nn.Module | None = None  # wrapped (compile, DDP) at the first batch: see prepare_model
        self.parameters = [p for p in model.parameters() if p.requires_grad]
        self.flops_per_image: float | None = None
        self.peak_flops = device_peak_flops(self.device, self.precision) if context.is_main else None
        self.starved_windows = 0
        self.reporter = Reporter(context.is_main, self.stop_at, 0)
        # a run whose metrics.jsonl cannot be written stops at the next step, on every rank, with a checkpoint
        self.run_log = RunLog(self.output, context.is_main, config, on_failure=self._stop_for_storage)
        # sharded (--shard-model), checkpoints are folders of every rank's shards that load on any process count
        self.saver = checkpoints.RunCheckpoints(self.output, config.keep, self.reporter.print, config.shard_model)
        self.plot = BackgroundPlot(self.output, self.reporter.print)
        if context.is_main:
            with storage.writing(self.output):
                self.output.mkdir(parents=True, exist_ok=True)
            storage.write_text(self.output / "config.yaml", config.to_yaml())
        if config.resume:
            self._restore(Path(config.resume))
            self.run_log.truncate_after(self.state.step)
        self.reporter.update(self.state.step, "")
        count = sum(p.numel() for p in self.parameters)
        self.reporter.print(
            f"{self.task.kind}: {config.model} ({describe_architecture(model, config.img_size)}; "
            f"{f'{count / 1e6:.1f}M' if count >= 1e5 else f'{count:,}'} trainable parameters) on "
            f"{context.world_size}× {self.device.type}, precision {self.precision}\n"
            f"batch {dataset.batch_size} per process × {context.world_size} process(es) × {config.grad_accum} "
            f"accumulation = {global_batch} images per step; lr = {config.base_lr:g} × {global_batch}/512 = "
            f"{config.base_lr * lr_factor:.3g}; {self.steps_per_epoch} steps per epoch, {self.total_steps} in all"
            + (f", stopping after {self.stop_at} (--max-steps)" if self.stop_at < self.total_steps else "")
            + f"; warmup {config.warmup_epochs:g} epoch(s)"
            f"{' (the default, fitted to the run)' if 'warmup_epochs' in config.auto else ''}\n"
            + (f"process group: {torch.distributed.get_backend()}, {context.world_size} ranks, collectives time out "
               f"after {config.dist_timeout:g} min\n" if context.distributed else "")
            + (f"{parallelize.describe_mesh(self.mesh)}: {parallelize.local_numel(self.parameters) / 1e6:.2f}M "
               f"of the {count / 1e6:.2f}M trainable parameters on each\n" if self.sharded else "")
            + f"output: {self.output}"
        )
        slow = emulated_bf16_warning(self.precision, self.device)
        if context.is_main and slow:
            self.reporter.print(slow)
        shortage = (too_few_shards(len(dataset.shards.urls), context.world_size, dataset.workers,
                                   dataset.shards.num_samples)
                    if getattr(dataset, "num_consumers", 0) else None)  # the CPU stream's loader processes
        if context.is_main and shortage:
            self.reporter.print(f"warning: {shortage}")
        self.window = LogWindow(self.device)

    def prepare_model(self, batch: dict[str, Any]) -> None:
        """At the first batch: count the training FLOPs per image on a meta-device copy (for MFU), freeze
        parameters that never get a gradient (e.g. an attention-pooling head SimMIM does not use, which DDP
        would wait for), then compile and wrap for DDP."""
        model = self.task.model
        self.flops_per_image, unused = count_training_flops(
            self.flops_model or model, batch, lambda m, b: self.task.training_step(m, b)["loss"])
        if unused:
            for name, parameter in model.named_parameters():
                if name in unused:
                    parameter.requires_grad_(False)
            self.parameters = [p for p in model.parameters() if p.requires_grad]
            modules = sorted({name.rsplit(".", 1)[0] for name in unused})
            shown = ", ".join(m + ".*" for m in modules if not any(m.startswith(f"{other}.") for other in modules))
            self.reporter.print(f"note: {len(unused)} parameter tensor(s) get no gradient in {self.task.kind} "
                                f"({shown}); they stay as they are")
        self.train_model = self._wrap(model)

    def _wrap(self, model: nn.Module) -> nn.Module:
        train_model = torch.compile(model) if self.config.compile else model
        if self.context.distributed and not self.sharded:
            train_model = parallelize.replicate(train_model, self.device, self.config.bf16_grad_reduce)
        return train_model

    def _install_signal_handlers(self) -> dict:
        first_signal = 0.0

        def request_stop(signum, frame):
            nonlocal first_signal
            if not self.stop_requested:
                self.stop_requested, first_signal = True, time.monotonic()
            elif time.monotonic() - first_signal > REPEATED_SIGNAL_SECONDS:  # a second Ctrl-C stops at once
                raise KeyboardInterrupt

        previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread
                previous[sig] = signal.signal(sig, request_stop)
        return previous

    # -- one epoch, one batch, one optimizer step --------------------------------------------------

    def run_epoch(self, batches: Any, epoch: int, end_step: int) -> None:
        """Optimizer steps until ``end_step`` on the batches of ``batches`` (an iterator over the run's epochs): a
        log line every ``--log-every`` steps, checkpoints every ``--save-every`` steps, and a checkpoint then
        :class:`Interrupted` when a stop was requested."""
        config, state = self.config, self.state
        self.task.model.train()
        while state.step < end_step:
            for micro in range(config.grad_accum):
                self.train_step(next(batches), last_micro=micro == config.grad_accum - 1)
            self.optimizer_step()
            if state.step % config.log_every == 0 or state.step == end_step:
                self.log_window(epoch)
            if config.save_every and state.step % config.save_every == 0:
                with self.window.paused():
                    self.save()
            if self.context.distributed:  # every rank stops at the same step, or some would wait in DDP forever
                self.stop_requested = distributed.any_rank(self.stop_requested, self.context)
            if self.stop_requested:
                path = self.save()
                raise Interrupted(f"stopped at step {state.step}; saved {path}; continue with the same command "
                                  f"and --resume auto --output {self.output}")

    def train_step(self, batch: dict[str, Any], last_micro: bool) -> None:
        """Forward and backward of one batch on the device (gradients accumulate until the optimizer step)."""
        self.state.skipped_samples += self._report_skipped(batch)
        self.task.observe_batch(batch)
        if self.train_model is None:
            self.prepare_model(batch)
        sync = last_micro or not self.context.distributed
        with contextlib.nullcontext() if sync else parallelize.accumulating(self.task.model, self.train_model):
            with autocast(self.precision, self.device):
                loss = self.task.training_step(self.train_model, batch)["loss"]
            self.scaler.scale(loss / self.config.grad_accum).backward()
        self.window.add(loss.detach(), len(batch["label"] if "label" in batch else batch["image"]))

    def optimizer_step(self) -> None:
        """Unscale, clip, step (skipped when the gradients are not finite), schedule the next lr.

        No host-device sync: the finiteness of the all-reduced gradient norm (the same on every rank) stays on
        the device and tells the fused optimizer to skip; the counts are read at the next log line.
        """
        state = self.state
        self.scheduler.step_update(state.step)
        self.scaler.unscale_(self.optimizer)
        grad_norm = parallelize.clip_grad_norm(self.parameters, self.config.clip_grad or math.inf)
        nonfinite = ~torch.isfinite(grad_norm)
        if self.scaler.is_enabled() and not self.sharded:
            self.scaler.step(self.optimizer)  # skips steps with inf/NaN gradients itself
        # sharded, the scaler's per-device inf flag cannot reach a fused step over DTensors; the norm of all shards'
        # gradients says the same on every rank, after the scaler's all-reduced check in unscale_
        elif self.skips_on_device:
            self.optimizer.found_inf = nonfinite.float()
            self.optimizer.step()
            del self.optimizer.found_inf
        elif not nonfinite.item():  # optimizers without a device-side skip (LARS, SGD): one sync
            self.optimizer.step()
        self.task.after_optimizer_step(state.step + 1)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        state.step += 1
        self.window.grad_norm = grad_norm.detach()
        self.window.count_step(nonfinite)

    def _check_nonfinite(self) -> None:
        """Brings the device's non-finite step counts to the host (a sync) and stops a diverging run."""
        state = self.state
        state.nonfinite_steps, state.nonfinite_in_a_row = self.window.nonfinite_counts(
            state.nonfinite_steps, state.nonfinite_in_a_row)
        if state.nonfinite_in_a_row >= MAX_NONFINITE_IN_A_ROW:
            last = checkpoints.latest_checkpoint(self.output)
            raise TrainingDiverged(
                f"loss or gradients were not finite for {state.nonfinite_in_a_row} steps in a row (step "
                f"{state.step}); last good checkpoint: {last or 'none yet'}; try --precision bf16 or fp32, a lower "
                "--base-lr or a longer --warmup-epochs")

    def end_epoch(self) -> None:
        """A whole epoch done: the task evaluates (all ranks, each its share) and its figures are logged."""
        epoch = self.state.step // self.steps_per_epoch
        with parallelize.gathered(self.sharded_modules):  # the ranks' shares differ: no forward may be a collective
            figures = self.task.after_epoch(self.output, epoch, self.state.step)
        if figures:
            self.run_log.log({"step": self.state.step, "epoch": epoch, **figures})
            self.reporter.print(f"epoch {epoch}: " + "  ".join(f"{k} {v:.2f}%" if "top" in k else f"{k} {v:.4g}"
                                                               for k, v in figures.items()
                                                               if isinstance(v, (int, float))))

    # -- logging -----------------------------------------------------------------------------------

    def _report_skipped(self, batch: dict[str, Any]) -> int:
        skipped = batch.pop("skipped", [])
        for description in list(dict.fromkeys(skipped))[:5]:  # a corrupt shard: one line, each lost sample counted
            self.reporter.print(f"warning: skipped a bad sample: {description}")
        return len(skipped)

    def log_window(self, epoch: int) -> None:
        """A metrics row and a progress update for the steps since the last one (figures summed over ranks)."""
        state = self.state
        self._check_nonfinite()
        loss_sum, count, images, seconds, waited = self.window.flush()
        totals = distributed.all_reduce_sum(
            [loss_sum, count, images, float(state.skipped_samples), waited / max(seconds, 1e-9)], self.device)
        world = self.context.world_size
        loss = totals[0] / max(totals[1], 1)
        images_per_second = totals[2] / max(seconds, 1e-9)
        data_wait = totals[4] / world  # the mean over ranks of the share of time spent waiting for batches
        lr = max(group["lr"] for group in self.optimizer.param_groups)
        row = {
            "step": state.step, "epoch": round(state.step / self.steps_per_epoch, 4), "loss": loss, "lr": lr,
            "img_per_s": round(images_per_second, 2), "img_per_s_per_device": round(images_per_second / world, 2),
            "data_wait": round(data_wait, 4), "grad_norm": self.window.last_grad_norm(),
            "skipped_samples": int(totals[3]), "nonfinite_steps": state.nonfinite_steps,
        }
        if self.flops_per_image and self.peak_flops:
            achieved = self.flops_per_image * images_per_second / world
            if achieved > self.peak_flops:  # MFU never above 1: the peak is timed again, and at least this
                with self.window.paused():
                    self.peak_flops = raised_peak(self.peak_flops, achieved, self.device, self.precision)
            row["mfu"] = round(achieved / self.peak_flops, 4)
        # a mixture's samples of each source in this epoch so far (from the epoch order: the same on every rank)
        by_source = getattr(self.dataset, "source_samples", lambda *_: None)(
            epoch, (state.step - epoch * self.steps_per_epoch) * self.config.grad_accum)
        if by_source:
            row["source_samples"] = by_source
        self.run_log.log(row)
        # a CPU's "peak" is a matmul timed on a machine other jobs may share: its MFU stays in metrics.jsonl only
        stats = f"loss {loss:.4f}  lr {lr:.2e}  {images_per_second:.1f} img/s  data wait {data_wait:.0%}" + (
            f"  MFU {row['mfu']:.0%}" if "mfu" in row and self.device.type != "cpu" else "")
        mix = "  by source " + " · ".join(f"{name} {count:,}" for name, count in by_source.items()) if by_source else ""
        self.reporter.update(state.step, stats + mix, f"epoch {epoch + 1}/{self.config.epochs}  step {state.step}  "
                             f"{stats}{mix}"
                             + (f"  skipped samples {row['skipped_samples']}" if row["skipped_samples"] else ""))
        self._warn_if_starved(data_wait)

    def _warn_if_starved(self, data_wait: float) -> None:
        """Says once what to do when the device keeps waiting for data (three windows in a row)."""
        self.starved_windows = self.starved_windows + 1 if data_wait > DATA_WAIT_WARNING else 0
        if self.starved_windows == 3 and self.device.type == "cuda":
            self.reporter.print(
                f"warning: the GPUs wait for data {data_wait:.0%} of the time: raise --workers (now "
                f"{self.config.workers}) if the node has idle cores, write more shards than loader processes, or "
                "decode on the GPU (--decode gpu)")

    # -- checkpoints -------------------------------------------------------------------------------

    def save(self) -> Path:
        """Every rank calls this at the same step (rank 0 writes, the others wait; sharded, every rank writes its
        shards)."""
        state = self.state
        path = self.output / checkpoints.checkpoint_name(state.step, self.config.shard_model)
        if state.last_saved_step == state.step:
            return path
        self._check_nonfinite()
        if state.nonfinite_in_a_row:  # never let a diverging stretch push the last good checkpoint out
            return checkpoints.latest_checkpoint(self.output) or path
        rng_states = distributed.gather_objects(checkpoints.rng_state())
        failure: StorageError | None = None
        if self.context.is_main or self.config.shard_model:
            try:
                self.saver.save(self._checkpoint(rng_states), path)
            except StorageError as error:
                failure = error
        with parallelize.gathered(self.sharded_modules):  # the previews' forward passes run on rank 0 alone
            if self.context.is_main and failure is None:
                try:
                    figures = self.task.after_checkpoint(self.output, state.step) or {}
                    if figures:
                        self.run_log.log({"step": state.step, "epoch": round(state.step / self.steps_per_epoch, 4),
                                          **figures})
                    self.plot.request()  # metrics.png, redrawn beside the training (a failure: one warning)
                except StorageError as error:
                    failure = error
        if self.context.is_main:
            failure = failure or self.run_log.failure
        # in place of a barrier: every rank learns whether rank 0 could write, and all stop together (none waits)
        if distributed.any_rank(failure is not None, self.context):
            hint = distributed.resume_hint(self.config)
            if not self.context.is_main:  # rank 0's own error names the cause: let the launcher see rank 0 fail first
                time.sleep(FOLLOWER_GRACE_S)
                raise StorageError(f"{failure or f'rank 0 could not write to {self.output} (its message says why)'}"
                                   f"; {hint}")
            raise StorageError(f"{failure}; {hint}")
        state.last_saved_step = state.step
        return path

    def _stop_for_storage(self, error: StorageError) -> None:
        """metrics.jsonl could not be written: stop at the end of this step, as a stop request does."""
        self.stop_requested = True

    def _checkpoint(self, rng_states: list[dict[str, Any]]) -> dict[str, Any]:
        state = self.state
        model_state, optimizer_state = parallelize.training_state(self.task.model, self.optimizer,
                                                                  by_name=self.config.shard_model)
        return {
            "kind": self.task.kind,
            "config": self.config.to_dict(),
            "model": model_state,
            "optimizer": optimizer_state,
            "scaler": self.scaler.state_dict(),
            "step": state.step,
            "epoch": state.step / self.steps_per_epoch,  # epochs done, fractional mid-epoch
            "world_size": self.context.world_size,
            "global_batch": self.global_batch,
            "data": self._data_position(),
            "nonfinite_steps": state.nonfinite_steps,
            "skipped_samples": state.skipped_samples,
            "rng": rng_states,  # one per rank, so that ranks keep drawing different numbers after a resume
            **self.task.extra_state(),
        }

    def _data_position(self) -> dict[str, Any] | None:
        """Where the run is in its epoch's sample order (``pipeline.ShardStream.resume_position``), or None."""
        position = getattr(self.dataset, "resume_position", None)
        epoch, offset = divmod(self.state.step, self.steps_per_epoch)
        return position(epoch, offset * self.config.grad_accum) if position is not None else None

    def _restore(self, path: Path) -> None:
        state = self.state
        sharded_checkpoint = checkpoints.is_sharded_checkpoint(path)
        checkpoint = (checkpoints.check_sharded(path)[0] if sharded_checkpoint
                      else checkpoints.load_checkpoint(path, map_location="cpu"))
        if checkpoint.get("kind") != self.task.kind:
            raise SimmimError(f"{path} is a {checkpoint.get('kind', 'foreign')} checkpoint, "
                              f"it cannot resume a {self.task.kind} run")
        if sharded_checkpoint:  # read into this run's own tensors: its shards, on any process count
            sections = {k: v for k, v in self.task.extra_state().items() if isinstance(v, dict)}  # a sharded EMA
            checkpoint = parallelize.restore_sharded(path, self.task.model, self.optimizer, sections)
        elif "optimizer" not in checkpoint:
            raise SimmimError(f"{path} holds the weights only (a consolidated copy), not the optimizer's state a run "
                              "resumes with; resume from the sharded checkpoint folder it was made from")
        else:
            try:
                parallelize.restore(checkpoint, self.task.model, self.optimizer)
            except RuntimeError as error:
                raise SimmimError(f"{path} does not fit this model (--model {self.config.model}, --img-size "
                                  f"{self.config.img_size}): {str(error).splitlines()[1].strip()}") from error
        self.task.load_extra_state(checkpoint)
        self.scaler.load_state_dict(checkpoint["scaler"])
        state.step = state.last_saved_step = checkpoint["step"]
        state.nonfinite_steps = checkpoint.get("nonfinite_steps", 0)
        state.skipped_samples = checkpoint.get("skipped_samples", 0)
        same_processes = checkpoint.get("world_size", 1) == self.context.world_size
        if same_processes:
            checkpoints.set_rng_state(checkpoint["rng"][self.context.rank])
        else:
            torch.manual_seed(self.config.seed + 1000 * state.step + self.context.rank)
        exact = self._restore_data_position(checkpoint)
        written = f"note: {path.name} was written by {checkpoint.get('world_size', 1)} process(es), this run has " \
                  f"{self.context.world_size}"
        if checkpoint.get("global_batch", self.global_batch) != self.global_batch:
            self.reporter.print(
                f"{written}, and {checkpoint['global_batch']} images per step, this run {self.global_batch}: the "
                "learning rate and the steps per epoch change, the rest of the epoch is dealt out anew by step count "
                "(some of its samples are seen twice or not at all), and the random streams restart; "
                f"give --global-batch {checkpoint['global_batch']} to keep the schedule and resume exactly")
        elif "data" not in checkpoint and state.step % self.steps_per_epoch and self._data_position():
            self.reporter.print(f"note: {path.name} was written by an older version, which kept no position in the "
                                "epoch's sample order: the rest of the epoch is dealt out anew by step count")
        elif not same_processes:
            self.reporter.print(
                f"{written}: the global batch ({self.global_batch}) and the schedule are kept, "
                + ("the rest of the epoch is trained on exactly once" if exact else
                   "the rest of the epoch is dealt out anew by step count (--decode gpu, or shard lengths unknown): "
                   "some of its samples are seen twice or not at all")
                + "; the random streams (dropout, drop path) restart, so the weights are close to, not bitwise "
                "those of, an uninterrupted run")
        self.reporter.print(f"resumed from {path} at step {state.step}")

    def _restore_data_position(self, checkpoint: dict[str, Any]) -> bool:
        """Takes the checkpoint's position in its epoch's sample order where it fits this run (the same epoch,
        the same number of slots: the same global batch, the same blocks); returns whether the rest of the epoch is
        exact."""
        data = checkpoint.get("data")
        if getattr(self.dataset, "resume_position", None) is None:
            return False
        here = self._data_position()
        if data is None or here is None or (data["epoch"], data["slots"]) != (here["epoch"], here["slots"]):
            return False
        written_block = data.get("block", 1024)  # the block of checkpoints from before it was recorded
        if here.get("block") is not None and written_block != here["block"]:
            self.reporter.print(f"note: the checkpoint's epoch order was cut into blocks of {written_block:,} samples, "
                                f"this version's into {here['block']:,}: the rest of the interrupted epoch is dealt "
                                "out anew by step count (some of its samples are seen twice or not at all)")
            return False
        self.resume_consumed = [tuple(r) for r in data["consumed"]]
        return True
