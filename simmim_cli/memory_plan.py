"""Per-GPU memory of a run with replicas (DDP) or shards (FSDP, HSDP), with and without activation checkpointing,
and the communication a sharded step adds: what ``simmim check`` forecasts from what it measured.

States follow the rule for AdamW with fp32 master weights: 4 bytes of weights, 4 of gradients and 8 of AdamW's
two moments per parameter, 16 in all, divided by the shard count when sharded. Activations are the check's
measurement for one step at the run's batch per process (its peak less the states it held); where nothing can run
(a model too big for the machine at hand) they are counted on the meta device instead: the bytes of the tensors
autograd keeps for the backward pass (:func:`saved_activation_bytes`). Both are forecasts of a GPU's figure, not a
measurement on it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

BYTES_PER_PARAMETER = 16  # fp32 weights 4 + gradients 4 + AdamW's exp_avg and exp_avg_sq 8
HEADROOM = 0.92  # the share of a GPU's memory a forecast may fill: the allocator's fragmentation, CUDA's context


def state_bytes(parameters: int, shards: int = 1) -> float:
    """Weights, gradients and AdamW state per GPU."""
    return BYTES_PER_PARAMETER * parameters / max(shards, 1)


def saved_activation_bytes(model: nn.Module, batch: dict[str, Any],
                           step: Callable[[nn.Module, dict[str, Any]], torch.Tensor],
                           checkpointing: bool = False, dtype: torch.dtype | None = None) -> int:
    """The bytes autograd keeps for the backward pass of ``step(model, batch)`` (the activations), counted on a
    meta-device copy: no memory, no compute, any model size. ``checkpointing``: with timm's gradient checkpointing
    on (only each block's input is kept); ``dtype``: the copy's weights in that type (``step`` casts its inputs)."""
    from .flops import meta_copy

    copy = meta_copy(model)
    if dtype is not None:
        copy.to(dtype)
    if checkpointing:
        for module in copy.modules():
            if hasattr(module, "set_grad_checkpointing"):
                module.set_grad_checkpointing(True)
    weights = {p.untyped_storage()._cdata for p in copy.parameters()}
    saved: dict[int, int] = {}

    def keep(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage._cdata not in weights:  # weights saved for a matmul's backward are states, counted above
            saved[storage._cdata] = storage.nbytes()
        return tensor

    meta_batch = {k: v.to("meta") if torch.is_tensor(v) else v for k, v in batch.items()}
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        step(copy, meta_batch)
    return sum(saved.values())


def layouts(world_size: int, per_node: int) -> list[tuple[str, int]]:
    """(name, shard count) of the ways ``world_size`` GPUs, ``per_node`` a node, can hold a model."""
    found = [("DDP", 1)]
    nodes = world_size // max(per_node, 1)
    if nodes > 1 and per_node > 1:
        found.append((f"HSDP {per_node}×{nodes}", per_node))  # shards within a node × replicas across nodes
    if world_size > 1:
        found.append((f"FSDP {world_size}", world_size))
    return found


def forecast(parameters: int, activations: float, checkpointed: float, world_size: int, per_node: int,
             block_parameters: int = 0, device_memory: int | None = None,
             current: tuple[int, bool] | None = None, accumulation: int = 1) -> list[dict[str, Any]]:
    """Per-GPU bytes of each layout, without and with activation checkpointing. ``activations`` and
    ``checkpointed``: per process at the run's batch; a sharded layout also holds one block's gathered weights and
    gradients (fp32: 8 bytes a parameter) while it runs, and the next block's gathered weights (prefetch); with
    ``accumulation`` above 1 it keeps whole fp32 gradients between micro-batches (4 bytes a parameter: no
    reduce-scatter until the last). ``current``: the run's own (shard count, checkpointing), marked ``current``."""
    rows = []
    for name, shards in layouts(world_size, per_node):
        gathered = 3 * 4 * block_parameters if shards > 1 else 0
        gathered += 4 * parameters if shards > 1 and accumulation > 1 else 0
        for recompute, acts in ((False, activations), (True, checkpointed)):
            total = state_bytes(parameters, shards) + acts + gathered
            rows.append({"layout": name, "shards": shards, "checkpointing": recompute, "gpus": world_size,
                         "bytes": total, "states": state_bytes(parameters, shards), "activations": acts,
                         "fits": None if device_memory is None else total <= HEADROOM * device_memory,
                         "current": (shards, recompute) == current})
    return rows


def fitting_layout(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The first layout that fits, in the order of what it costs in speed: replicas, shards within nodes, shards
    over all GPUs, then each with checkpointing (about 30% more compute)."""
    for recompute in (False, True):
        for row in rows:
            if row["checkpointing"] == recompute and row["fits"]:
                return row
    return None


def advice(rows: list[dict[str, Any]]) -> str | None:
    """What makes the run fit, when the layout it has now does not."""
    current = [row for row in rows if row["current"]]
    if not current or current[0]["fits"] is not False:
        return None
    row = fitting_layout(rows)
    if row is None:
        return ("no layout fits: even sharded over every GPU with --grad-checkpointing a GPU would need "
                f"{row_size(rows[-1])}; use more GPUs or a smaller --batch-size")
    options = (["--shard-model"] if row["shards"] > 1 else []) + (["--grad-checkpointing"] if row["checkpointing"]
                                                                  else [])
    return f"{' '.join(options)}: {row['layout']} needs about {row_size(row)} per GPU (forecast)"


def row_size(row: dict[str, Any]) -> str:
    return f"{row['bytes'] / 2**30:.1f} GiB"


def communication(parameters: int, shards: int, replicas: int, accumulation: int, param_bytes: int,
                  reduce_bytes: int, busbw_gbps: float) -> dict[str, float]:
    """Seconds a sharded optimizer step spends in collectives at the measured bus bandwidth (nccl-tests' busbw:
    an all-gather or a reduce-scatter of S bytes over n ranks moves S·(n-1)/n per rank, an all-reduce twice that).
    Every micro-batch all-gathers the weights twice (forward; backward, after the blocks freed them); the last
    reduce-scatters the gradients, and under HSDP all-reduces the shards across the replicas."""
    moved = (shards - 1) / shards if shards > 1 else 0.0
    all_gather = 2 * accumulation * parameters * param_bytes * moved
    reduce_scatter = parameters * reduce_bytes * moved
    all_reduce = 2 * parameters / shards * reduce_bytes * (replicas - 1) / replicas if replicas > 1 else 0.0
    rate = max(busbw_gbps, 1e-9) * 1e9
    return {"all_gather_s": all_gather / rate, "reduce_scatter_s": reduce_scatter / rate,
            "all_reduce_s": all_reduce / rate, "total_s": (all_gather + reduce_scatter + all_reduce) / rate}


def render(plan: dict[str, Any]) -> list[str]:
    """The check's "Memory forecast" lines."""
    lines = [f"  {'GPUs':>5}  {'layout':<13}{'checkpointing':<15}{'per GPU':>10}{'states':>10}{'activations':>13}"
             "  fits"]
    for row in plan["rows"]:
        fits = {None: "?", True: "yes", False: "NO"}[row["fits"]]
        lines.append(f"  {row['gpus']:>5}  {row['layout']:<13}{'yes' if row['checkpointing'] else 'no':<15}"
                     f"{row_size(row):>10}{row['states'] / 2**30:>9.2f}G{row['activations'] / 2**30:>12.2f}G  {fits}"
                     + ("  (this run)" if row["current"] else ""))
    lines.append(f"  states: {BYTES_PER_PARAMETER} bytes a parameter ÷ shards (HSDP A×B: A shards within a node, B "
                 f"replicas); activations: {plan['source']}")
    return lines


def block_parameters(model: nn.Module) -> int:
    """Parameters of the largest transformer block: what a sharded layout gathers at once."""
    from .parallelize import transformer_blocks

    sizes = [sum(p.numel() for p in block.parameters()) for block in transformer_blocks(model)]
    return max(sizes, default=0)



def from_check(per_rank: list[dict[str, Any]], parameters: int, world_size: int, per_node: int, sharded: bool,
               checkpointing: bool, accumulation: int, precision: str, bf16_reduce: bool, busbw_gbps: float | None,
               forecast_gpus: list[int]) -> dict[str, Any]:
    """The check's memory forecast for the run's own GPU count and the ``forecast_gpus`` counts, from the figures
    its processes measured (``held_bytes``, ``peak_memory``, and the meta-device counts of rank 0), and the
    collectives a sharded step adds at the measured bus bandwidth."""
    from .parallelize import mesh_shape

    first = per_rank[0]
    peaks = [r.get("peak_memory") or r.get("probe_peak") for r in per_rank]
    if all(peaks):  # measured: the step's peak less the states the process held
        activations = max(max(peak - r["held_bytes"], 0) for peak, r in zip(peaks, per_rank, strict=True))
        source = "measured (the step's peak less the states the process held" + (
            "; on a CPU the process's own memory counts in)" if first.get("device") == "cpu" else ")")
        ratio = first["saved_checkpointed"] / max(first["saved_activations"], 1)
        checkpointed = activations * ratio + first["saved_activations"] / max(first["blocks"], 1)
    else:  # the step did not fit: the tensors autograd keeps, counted on the meta device
        activations, checkpointed = first["saved_activations"], first["saved_checkpointed"]
        source = "counted on the meta device (the step did not fit to be measured)"
    from .preflight import memory_cap

    device_memory = first.get("device_memory") or memory_cap()  # a smaller GPU emulated (tests)
    shape = mesh_shape(world_size, per_node)
    rows = forecast(parameters, activations, checkpointed, world_size, per_node, first["block_parameters"],
                    device_memory, (shape[-1] if sharded else 1, checkpointing), accumulation)
    images = accumulation * world_size  # per step, kept on other GPU counts (with the batch per GPU)
    for gpus in forecast_gpus:
        if gpus != world_size:
            rows += forecast(parameters, activations, checkpointed, gpus, min(gpus, per_node if per_node > 1 else 8),
                             first["block_parameters"], device_memory, accumulation=max(1, images // gpus))
    plan: dict[str, Any] = {"rows": rows, "source": source, "advice": advice(rows)}
    if busbw_gbps and world_size > 1:
        shards = shape[-1] if sharded else world_size  # what sharding this job would do
        compute_bytes = {"bf16": 2, "fp16": 2}.get(precision, 4)
        plan["communication"] = communication(parameters, shards, world_size // shards, accumulation,
                                              compute_bytes, 2 if bf16_reduce else 4, busbw_gbps)
    return plan


def process_figures(trainer: Any, batch: dict[str, Any]) -> dict[str, Any]:
    """What one process of the check contributes: the fp32 states it holds at a step's peak (weights, gradients,
    AdamW moments of its shard) and, on a meta copy, the activations of ``batch`` with and without checkpointing."""
    from .flops import meta_copy
    from .parallelize import local_numel, optimizer_numel, transformer_blocks

    model = trainer.flops_model or meta_copy(trainer.task.model)  # a sharded model has its copy made before
    step = lambda m, b: trainer.task.training_step(m, b)["loss"]  # noqa: E731
    figures = {"held_bytes": 4 * (2 * local_numel(trainer.parameters) + optimizer_numel(trainer.optimizer)),
               "blocks": len(transformer_blocks(model)), "block_parameters": block_parameters(model)}
    try:
        figures.update(saved_activations=saved_activation_bytes(model, batch, step),
                       saved_checkpointed=saved_activation_bytes(model, batch, step, checkpointing=True))
    except (RuntimeError, NotImplementedError, TypeError, ValueError):  # an operation that needs real values
        figures.update(saved_activations=0, saved_checkpointed=0)
    return figures
