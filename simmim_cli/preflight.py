"""What ``simmim check`` measures and concludes, apart from the run itself: the environment, peak memory of a step,
the all-reduce bus bandwidth, and the forecast and verdict drawn from the measured figures.

``commands/check.py`` runs the real launcher, loader and engine steps and hands their timings here.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import os
import platform
import shutil
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from .dali import dali_installed

MEMORY_CAP_ENV = "SIMMIM_CHECK_MEMORY_CAP_MB"  # a step whose peak exceeds this counts as out of memory (tests)
PREFETCH_BATCHES = 2  # per loader worker: make_loader's prefetch_factor
INPUT_BOUND_SHARE = 0.10  # data wait above this share of a step: the run waits for its loaders
COMM_BOUND_SHARE = 0.5  # an all-reduce taking more than half a step: communication decides the speed

# ---------------------------------------------------------------------------------------------- environment


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity: SLURM's --cpus-per-task, taskset)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def batch_bytes(batch_size: int, img_size: int, image_spec: dict[str, Any] | None = None) -> int:
    """An image batch as the loaders hand it over (masks and labels are small beside it): uint8 RGB for photos,
    the run's channels in uint8 or float32 for other images (``image_spec.py``)."""
    channels, dtype = (image_spec or {}).get("channels", 3), (image_spec or {}).get("dtype", "uint8")
    return batch_size * channels * (1 if dtype == "uint8" else 4) * img_size * img_size


def environment(config: Any, local_processes: int, workers: int) -> tuple[dict[str, Any], list[str]]:
    """(figures, problems named with their fix) of the machine this process runs on."""
    problems: list[str] = []
    facts: dict[str, Any] = {
        "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "cudnn": _cudnn_version(),
        "nccl": None, "gpus": [],
    }
    if torch.cuda.is_available():
        with contextlib.suppress(Exception):
            facts["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            facts["gpus"].append({
                "name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
                "compute_capability": f"{props.major}.{props.minor}", "bf16": props.major >= 8,
            })
        if config.precision == "fp32" and facts["gpus"] and facts["gpus"][0]["bf16"]:
            problems.append("--precision fp32 on GPUs with bf16: about half the speed; use --precision auto (bf16)")
    cores = usable_cores()
    facts["cores_per_process"] = cores if cores < (os.cpu_count() or cores) else cores // max(local_processes, 1)
    facts["cores_usable"] = cores
    facts["loader_processes"] = workers
    wanted = local_processes * (max(workers, 0) + 1)
    if config.decode == "cpu" and wanted > cores:
        fitting = cores // max(local_processes, 1) - 1
        fix = f"lower --workers to {fitting} or give" if 0 < fitting < workers else "give"
        problems.append(f"{local_processes} training process(es) × ({workers} loader worker(s) + 1) want {wanted} "
                        f"cores, this node lets them use {cores}: {fix} the job more cores")
    needed = local_processes * max(workers, 1) * PREFETCH_BATCHES * batch_bytes(config.batch_size, config.img_size,
                                                                                  getattr(config, "image_spec", None))
    facts["shm_needed_gib"] = round(needed / 2**30, 3)
    with contextlib.suppress(OSError):
        usage = shutil.disk_usage("/dev/shm")
        facts["shm_free_gib"] = round(usage.free / 2**30, 2)
        if config.decode == "cpu" and workers and usage.free < needed * 1.5:
            problems.append(f"/dev/shm has {usage.free / 2**30:.2f} GiB free, the loaders keep about "
                            f"{needed / 2**30:.2f} GiB of batches in flight: give the container more "
                            "(docker run --shm-size=16g) or lower --workers/--batch-size")
    facts["onnxruntime_providers"] = _onnxruntime_providers()
    facts["dali"] = dali_installed()
    facts["trackers"] = {name: _has_module(name) for name in ("tensorboard", "wandb", "mlflow")}
    return facts, problems


def _cudnn_version() -> str | None:
    if not torch.backends.cudnn.is_available():
        return None
    version = torch.backends.cudnn.version()  # 92400 for 9.24.0
    return f"{version // 10000}.{version % 10000 // 100}.{version % 100}"


def _has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def _onnxruntime_providers() -> list[str] | None:
    try:
        import onnxruntime
    except ImportError:
        return None
    return list(onnxruntime.get_available_providers())


# ---------------------------------------------------------------------------------------------- memory


def memory_cap() -> int | None:
    """Bytes a step may peak at before it counts as out of memory: ``SIMMIM_CHECK_MEMORY_CAP_MB`` (tests, or a
    smaller GPU's size emulated on a larger one); None when unset."""
    value = os.environ.get(MEMORY_CAP_ENV)
    return int(float(value) * 2**20) if value else None


class PeakMemory:
    """The peak memory of the code run between :meth:`reset` and :meth:`read`, on the training device: the CUDA
    allocator's peak on a GPU, the process's peak resident set on the CPU (Linux: the high-water mark is reset
    through ``/proc/self/clear_refs``; elsewhere the process's lifetime peak)."""

    def __init__(self, device: torch.device):
        self.device = device

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back, so an earlier larger step does not count
        with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as file:
            file.write("5")  # resets the peak resident set size (VmHWM)

    def read(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device)
        with contextlib.suppress(OSError), open("/proc/self/status") as file:
            for line in file:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux

    def total(self) -> int | None:
        """The device's memory (None on the CPU)."""
        if self.device.type == "cuda":
            return torch.cuda.get_device_properties(self.device).total_memory
        return None


def is_out_of_memory(error: BaseException) -> bool:
    text = str(error).lower()
    return (isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in text
            or "can't allocate memory" in text)  # the CPU allocator's words


def free_memory(device: torch.device) -> None:
    """After an out-of-memory step: what it held goes back to the device."""
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------- communication


def bus_bandwidth(numel: int, dtype: torch.dtype, device: torch.device, repeats: int = 5,
                  group: Any = None) -> dict[str, float]:
    """All-reduce a tensor of ``numel`` elements (the gradients' size) over the process group, as nccl-tests
    does: ``algbw = bytes / time`` and ``busbw = algbw × 2(n−1)/n``, GB/s (1e9 bytes), from the best of
    ``repeats`` timed rounds after two untimed ones."""
    world = dist.get_world_size(group)
    tensor = torch.ones(numel, dtype=dtype, device=device)
    times = []
    for round_index in range(repeats + 2):
        dist.barrier(group)
        synchronize(device)
        started = time.perf_counter()
        dist.all_reduce(tensor, group=group)
        synchronize(device)
        if round_index >= 2:
            times.append(time.perf_counter() - started)
    seconds = min(times)
    size = numel * tensor.element_size()
    algbw = size / seconds / 1e9
    return {"bytes": size, "seconds": seconds, "algbw_gbps": algbw, "busbw_gbps": algbw * 2 * (world - 1) / world}


def synchronize(device: torch.device) -> None:
    """Waits for the GPU's queued work (a timer must not stop before it); nothing on a CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------- forecast


@dataclass
class Rates:
    """What the check measured, reduced to what the forecast needs (seconds per optimizer step, per rank)."""

    images_per_step: int  # per rank: batch × grad-accum
    compute_step_s: float  # forward, backward, all-reduce and optimizer step, synchronised; median step, slowest rank
    loop_step_s: float  # the same steps fed by the real loader: compute plus the mean wait for data (slowest rank)
    data_wait: float  # share of the loop's time spent waiting for batches (mean over ranks)
    loader_img_s: float | None  # images/s the rank's loader processes can deliver (timed read × processes)
    allreduce_s: float | None  # one all-reduce of the gradients (more than one process)
    epoch_start_s: float  # the loader's start (time to the first batch): once a run, its workers live for all epochs
    save_s: float  # one checkpoint (with the task's previews), as the run saves it
    saves_per_epoch: float  # at each epoch's end, and every --save-every steps
    steps_per_epoch: int
    total_steps: int
    epochs: int
    fits: bool = True  # the requested batch ran without running out of memory
    notes: list[str] = field(default_factory=list)


def forecast(rates: Rates) -> dict[str, Any]:
    """Seconds per step, per epoch and for the run, and the bound: input, communication, compute or memory."""
    # the loop's steps already include waiting for data; a loader slower than that shows in a longer run,
    # when the batches it had ready at the start are used up
    input_step_s = rates.images_per_step / rates.loader_img_s if rates.loader_img_s else 0.0
    step_s = max(rates.loop_step_s, input_step_s, rates.compute_step_s)
    comm_share = (rates.allreduce_s or 0.0) / rates.compute_step_s if rates.compute_step_s else 0.0
    input_share = max(rates.data_wait, 1 - rates.compute_step_s / step_s if step_s else 0.0)  # time not computing
    if not rates.fits:
        bound = "memory"
    elif input_share > INPUT_BOUND_SHARE:
        bound = "input"
    elif comm_share > COMM_BOUND_SHARE:
        bound = "communication"
    else:
        bound = "compute"
    per_epoch = rates.saves_per_epoch * rates.save_s  # what an epoch costs besides its steps
    epoch_s = rates.steps_per_epoch * step_s + per_epoch
    run_epochs = max(1, round(rates.total_steps / max(rates.steps_per_epoch, 1)))
    return {
        "bound": bound, "step_s": step_s, "input_step_s": input_step_s, "input_share": min(input_share, 1.0),
        "comm_share": comm_share, "epoch_s": epoch_s,
        "run_s": rates.epoch_start_s + rates.total_steps * step_s + per_epoch * run_epochs,
        "img_per_s_per_device": rates.images_per_step / step_s if step_s else 0.0,
    }


def advice(bound: str, config: Any, figures: dict[str, Any]) -> list[str]:
    """Concrete next steps for the bound the run hits; ``figures`` holds what the check measured."""
    tips: list[str] = []
    if bound == "memory":
        largest = figures.get("largest_batch")
        if largest:
            images = config.batch_size * config.grad_accum  # per process and optimizer step, kept as it is
            accum = next(k for k in range(-(-images // largest), images + 1) if images % k == 0)
            tips.append(f"--batch-size {images // accum} --grad-accum {accum}: the same global batch in smaller "
                        "pieces")
        if figures.get("grad_checkpointing_fits"):
            tips.append(f"--grad-checkpointing: the requested --batch-size {config.batch_size} fits with it "
                        "(about 30% more compute)")
        if not tips:
            tips.append("a smaller --batch-size (--find-batch finds the largest that fits) with --grad-accum")
    elif bound == "input":
        cores, workers = figures.get("cores_per_process", 1), config.workers or 0
        if workers + 1 < cores:
            tips.append(f"--workers {min(cores - 1, 12)}: this node gives each training process {cores} cores, "
                        f"{workers} decode now")
        if config.decode == "cpu":
            tips.append("--decode gpu: NVIDIA DALI decodes JPEGs on the GPU (pip install \"simmim-cli[dali]\")"
                        if figures.get("device") == "cuda" else
                        "more CPU cores per training process, or fewer training processes per node")
        if figures.get("shards", 0) < figures.get("consumers", 0):
            tips.append(f"more shards: {figures['shards']} for {figures['consumers']} loader processes "
                        "(simmim make-shards --max-size)")
    elif bound == "communication":
        if not config.bf16_grad_reduce:
            tips.append("--bf16-grad-reduce: half the all-reduce traffic")
        tips.append(f"a larger --batch-size (or --grad-accum {config.grad_accum * 2}): fewer all-reduces per image")
    else:
        if config.precision == "fp32":
            tips.append("--precision auto: bf16 where the device has it")
        if not config.compile and figures.get("device") == "cuda":  # on CPUs measured slower (docs/speed.md)
            tips.append("--compile: fused kernels, often 10-30% faster after a slow first step")
    return tips


def duration(seconds: float) -> str:
    """3 s, 4 min 10 s, 2 h 05 min, 3 d 4 h."""
    seconds = max(seconds, 0.0)
    if seconds < 60:
        return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {minutes:02d} min"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h"


def size(value: float | None) -> str:
    if value is None:
        return "-"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if value >= scale:
            return f"{value / scale:.2f} {unit}"
    return f"{value:.0f} B"


# ---------------------------------------------------------------------------------------------- the table


def render(report: dict[str, Any]) -> str:
    """The report as the table ``simmim check`` prints."""
    run, env, data, memory = report["run"], report["environment"], report["data"], report["memory"]
    lines: list[str] = []

    def section(title: str) -> None:
        lines.append("")
        lines.append(title)

    def row(name: str, value: str) -> None:
        lines.append(f"  {name:<14}{value}")

    lines.append(f"simmim check {report['command']}: {run['model']}, {run['world_size']} process(es) × "
                 f"{report['processes'][0]['device']}, batch {run['batch_size']} × {run['world_size']} × "
                 f"{run['grad_accum']} accumulation = {run['global_batch']} images per step, precision "
                 f"{run['precision']}")
    section("Environment")
    versions = ", ".join(f"{name} {env[name]}" for name in ("cuda", "cudnn", "nccl") if env.get(name))
    row("software", f"python {env['python']}, torch {env['torch']}" + (f", {versions}" if versions else ""))
    gpus = env["gpus"]
    row("GPUs", "none" if not gpus else f"{len(gpus)}× {gpus[0]['name']}, {gpus[0]['memory_gib']} GiB, compute "
        f"capability {gpus[0]['compute_capability']}, bf16 {'yes' if gpus[0]['bf16'] else 'no'}")
    row("cores", f"{env['cores_usable']} usable, {env['cores_per_process']} per training process; "
        f"{env['loader_processes']} loader process(es) each")
    if "shm_free_gib" in env:
        row("/dev/shm", f"{env['shm_free_gib']} GiB free, about {env['shm_needed_gib']} GiB of batches in flight")
    providers = env["onnxruntime_providers"]
    row("onnxruntime", ", ".join(providers) if providers else "not installed")
    row("extras", f"DALI {'installed' if env['dali'] else 'not installed'}; trackers: "
        + (", ".join(name for name, ok in env["trackers"].items() if ok) or "none"))
    section("Data")
    if data.get("shards") is not None:
        classes = f", {data['classes']} classes" if data.get("classes") else ", unlabelled"
        row("shards", f"{data['shards']} ({data['samples']} samples{' per epoch' if data.get('sources') else ''}"
            f"{classes}) for {data['consumers']} loader process(es)")
    for source in data.get("sources", []):  # a mixture: each source's part of the epoch and its read speed
        speed = (f"; {source['img_per_s_per_loader']:.0f} img/s per loader process"
                 if source.get("img_per_s_per_loader") else "")
        row("source", f"{source['name']}: {source['samples']} samples in {source['shards']} shard(s), "
            f"{source['per_epoch']} per epoch = {source['epoch_share']:.1%} ({source['share']}){speed}: "
            f"{source['path']}")
    if data.get("img_per_s_per_loader"):
        sizes = ", ".join(f"{w}×{h}" for w, h in data["sizes"])
        row("read", f"{data['images_read']} images in {data['read_seconds']:.2f} s: "
            f"{data['img_per_s_per_loader']:.0f} img/s per loader process (decode + augment)")
        row("image sizes", f"{sizes}" + (f" ({data['distinct_sizes']} distinct)" if data["distinct_sizes"] > 4
                                         else ""))
        row("unreadable", str(data["unreadable_count"]) if data["unreadable_count"] else "none found")
    elif data.get("note"):
        row("read", data["note"])
    section("Model and memory")
    flops = f"; {run['flops_per_image'] / 1e9:.3g} GFLOP per training image" if run["flops_per_image"] else ""
    count = run["parameters"]
    row("parameters", f"{f'{count / 1e6:.1f}M' if count >= 1e5 else f'{count:,}'} trainable{flops}")
    on_cpu = report["processes"][0]["device"] == "cpu"
    where = "the process's peak resident memory" if on_cpu else "torch.cuda.max_memory_allocated"
    device_memory = report["processes"][0]["device_memory"]
    row("peak memory", f"{size(memory['peak_memory'])} per process at batch {run['batch_size']} ({where})"
        + (f", of {size(device_memory)}" if device_memory else "")
        + ("" if memory["requested_fits"] else ": DOES NOT FIT")
        + (f" (memory cap {size(memory['cap'])}, {MEMORY_CAP_ENV})" if memory.get("cap") else ""))
    if memory["largest_batch"] is not None:
        failing = memory["first_failing_batch"]
        row("largest batch", f"{memory['largest_batch']} per process fits"
            + (f", {failing} does not" if failing else " (the search stopped before running out)"))
    if memory["grad_checkpointing_fits"] is not None:
        row("checkpointing", f"--grad-checkpointing {'lets' if memory['grad_checkpointing_fits'] else 'does not let'}"
            f" batch {run['batch_size']} fit")
    plan = report.get("memory_plan")
    if plan:
        from .memory_plan import render as render_plan

        section("Memory forecast (per GPU, replicated or sharded, each with and without --grad-checkpointing)")
        lines.extend(render_plan(plan))
        if plan.get("communication"):
            comm = plan["communication"]
            row("sharded comm", f"{comm['total_s'] * 1e3:.1f} ms of all-gathers, reduce-scatters (and all-reduces "
                "across nodes) per step at the measured bandwidth")
    forecast = report["forecast"]
    if forecast is not None:
        section("Speed (measured: real steps after warm-up, each process)")
        for process in report["processes"]:
            mfu = f", MFU {process['mfu']:.1%}" if process.get("mfu") is not None else ""
            row(f"rank {process['rank']}", f"{process['img_per_s']:.1f} img/s, compute "
                f"{process['compute_step_s'] * 1e3:.1f} ms/step, data wait {process['data_wait']:.0%}{mfu}, "
                f"peak {size(process['peak_memory'])}")
        allreduce = report["allreduce"]
        if allreduce:
            row("all-reduce", f"{size(allreduce['bytes'])} of gradients in {allreduce['seconds'] * 1e3:.1f} ms: "
                f"algbw {allreduce['algbw_gbps']:.2f} GB/s, busbw {allreduce['busbw_gbps']:.2f} GB/s, "
                f"{forecast['comm_share']:.0%} of a step's compute")
        section("Forecast (from the measured rates)")
        loader = (f", loaders {forecast['loader_img_s']:.0f} img/s per process"
                  if forecast.get("loader_img_s") else "")
        row("step", f"{forecast['step_s'] * 1e3:.1f} ms ({forecast['img_per_s_per_device']:.1f} img/s per process"
            f"{loader})")
        row("epoch", f"{duration(forecast['epoch_s'])} ({run['steps_per_epoch']} steps, checkpoint "
            f"{forecast['save_s']:.1f} s; the loader starts once, in {forecast['epoch_start_s']:.1f} s)")
        row("run", f"{duration(forecast['run_s'])} ({run['total_steps']} steps"
            + ("; evaluation after each epoch not included)" if run.get("evaluates") else ")"))
    verdict = report["verdict"]
    section(f"Verdict: {'the run will work' if verdict['ok'] else 'the run will NOT work as given'}; "
            f"{verdict['bound']}-bound" if verdict["bound"] != "memory" else
            "Verdict: the batch does not fit in memory")
    for tip in verdict["advice"]:
        lines.append(f"  try {tip}")
    if report["problems"]:
        section("Problems")
        for problem in report["problems"]:
            lines.append(f"  - {problem}")
    if "seconds" in report:
        lines.append("")
        lines.append(f"checked in {report['seconds']:.0f} s")
    return "\n".join(lines).lstrip("\n")
