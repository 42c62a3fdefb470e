"""Sharded data parallelism for models larger than one GPU's memory: PyTorch's FSDP2 (``fully_shard``) applied to
a model, and DDP's replicas for those that fit, apart from the training loop (torchtitan keeps ``parallelize``
apart from its loop; so do we).

``--shard-model`` shards every transformer block (timm's ViT/BEiT ``blocks``, Swin's ``layers[i].blocks``) and then
the root, so that parameters, gradients and AdamW state are split over the ranks (each holds 1/N) and a block's
weights are all-gathered just before it runs. Across nodes the mesh is 2-D (HSDP): the weights are sharded among
the GPUs of a node and replicated across nodes, so the traffic between nodes stays one gradient all-reduce. The
engine calls :func:`shard` before it builds the optimizer (``fully_shard`` replaces the parameters) and uses the
few helpers below where sharded and replicated models differ: gradient sync while accumulating, the gradient
norm, evaluation, and a model's full state dict.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from .errors import SimmimError


def _fsdp():
    try:
        from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
    except ImportError:
        FSDPModule = None
    if FSDPModule is None or not hasattr(FSDPModule, "reset_iter_state"):
        raise SimmimError(f"--shard-model needs PyTorch's FSDP2 with FSDPModule.reset_iter_state, which torch "
                          f"{torch.__version__} lacks; upgrade torch (2.14 has it) or train without --shard-model")
    return FSDPModule, MixedPrecisionPolicy, fully_shard


def mesh_shape(world_size: int, local_world_size: int) -> tuple[int, ...]:
    """(ranks,) for FSDP on one node; (nodes, ranks per node) for HSDP when the job spans nodes of several GPUs
    each: shards within a node (NVLink), replicas across nodes (an all-reduce over the slower network)."""
    nodes = world_size // max(local_world_size, 1)
    if nodes > 1 and local_world_size > 1 and nodes * local_world_size == world_size:
        return nodes, local_world_size
    return (world_size,)


def describe_mesh(shape: tuple[int, ...]) -> str:
    if len(shape) == 2:
        return f"HSDP: sharded over the {shape[1]} processes of each node, replicated over {shape[0]} nodes"
    return f"FSDP: sharded over {shape[0]} processes"


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of every timm encoder in ``model``, in order: the members of each ``blocks``
    container (ViT and BEiT: ``model.blocks``; Swin: ``model.layers[i].blocks``)."""
    found = []
    for module in model.modules():
        blocks = getattr(module, "blocks", None)
        if isinstance(blocks, (nn.Sequential, nn.ModuleList)):
            found += list(blocks)
    return found


def mixed_precision(precision: str, bf16_grad_reduce: bool = False) -> Any:
    """FSDP2's mixed precision for the run's precision: blocks compute in bf16/fp16 from fp32 master weights, and
    gradients are reduced in fp32 (bf16 with --bf16-grad-reduce: half the traffic)."""
    _, MixedPrecisionPolicy, _ = _fsdp()
    compute = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return MixedPrecisionPolicy(param_dtype=compute,
                                reduce_dtype=torch.bfloat16 if bf16_grad_reduce else torch.float32)


def shard(modules: Iterable[nn.Module], device: torch.device, world_size: int, local_world_size: int,
          precision: str, bf16_grad_reduce: bool = False) -> tuple[int, ...]:
    """``fully_shard`` on each transformer block of each module, then on the module itself; the shards are moved
    to ``device`` (a whole model never lands there). Returns the mesh's shape."""
    from torch.distributed.device_mesh import init_device_mesh

    _, _, fully_shard = _fsdp()
    shape = mesh_shape(world_size, local_world_size)
    names = ("replicate", "shard") if len(shape) == 2 else ("shard",)
    mesh = init_device_mesh(device.type, shape, mesh_dim_names=names)
    policy = mixed_precision(precision, bf16_grad_reduce)
    for module in modules:
        for block in transformer_blocks(module):
            fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=True)
        # the root's weights are needed again at the start of the backward pass: kept after the forward
        fully_shard(module, mesh=mesh, mp_policy=policy, reshard_after_forward=False)
    return shape


def replicate(model: nn.Module, device: torch.device, bf16_grad_reduce: bool = False) -> nn.Module:
    """The model replicated on every rank (DDP): gradients all-reduced in the backward pass."""
    from torch.nn.parallel import DistributedDataParallel

    # The head's 1×1 conv gets gradients whose strides differ from the bucket's only on size-1 axes:
    # the same memory layout, so DDP's warning about it is a false alarm.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    device_ids = [device.index] if device.type == "cuda" else None
    # gradients live in the all-reduce buckets: no copy in and out, less memory; buffers (position
    # tables, relative-position indices) are constants, so nothing to broadcast before each forward
    constant_buffers = ({"forward_sync_buffers": False}  # newer torch's name for it
                        if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                        else {"broadcast_buffers": False})
    replicated = DistributedDataParallel(model, device_ids=device_ids, gradient_as_bucket_view=True,
                                         **constant_buffers)
    if bf16_grad_reduce:
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import bf16_compress_hook

        replicated.register_comm_hook(None, bf16_compress_hook)
    return replicated


def is_sharded(model: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without FSDP2 has no sharded model
        return False
    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def accumulating(model: nn.Module, train_model: nn.Module) -> Iterator[None]:
    """Around the forward and backward of a micro-batch that is not the last before an optimizer step: gradients
    add up locally, with no reduce-scatter (sharded ``model``) or all-reduce (DDP ``train_model``)."""
    if is_sharded(model):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        with train_model.no_sync():
            yield


def clip_grad_norm(parameters: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clips to ``max_norm`` by the norm of all gradients (over every shard: the same value on every rank) and
    returns that norm as a plain tensor, on the device, unsynchronised."""
    from torch.distributed.tensor import DTensor

    norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


def grad_scaler(device: torch.device, enabled: bool, sharded: bool) -> torch.amp.GradScaler:
    """fp16's loss scaler. Sharded, each rank sees only its shard of the gradients: the sharded scaler agrees over
    all ranks on whether any of them found an inf, so that every rank skips the same steps."""
    if sharded and enabled:
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        # its one-element inf flag meets the DTensor gradients as a replicated tensor, as it should
        warnings.filterwarnings("ignore", message="Found a non-scalar tensor with numel=1")
        return ShardedGradScaler(device.type, enabled=True)
    return torch.amp.GradScaler(device.type, enabled=enabled)


@contextlib.contextmanager
def gathered(modules: Iterable[nn.Module]) -> Iterator[None]:
    """Every rank (together) all-gathers the sharded ``modules`` once and keeps them whole until the block ends, so
    that in between any rank may run forward passes of its own (evaluation, previews on rank 0) without a
    collective. Costs each rank the whole model's weights (in the compute precision) for that time; nothing for
    modules that are not sharded. Between optimizer steps only: FSDP's per-step bookkeeping is reset after it."""
    sharded = [module for module in modules if is_sharded(module)]
    units = [unit for module in sharded for unit in module.modules() if is_sharded(unit)]
    try:
        for module in sharded:
            module.set_reshard_after_forward(False)  # the forward passes below keep what was gathered
        for unit in units:
            unit.unshard()
        yield
    finally:
        for unit in units:
            unit.reshard()
        for module in sharded:  # back to how shard() set them up: blocks reshard after the forward, the root not
            module.set_reshard_after_forward(True)
            module.set_reshard_after_forward(False, recurse=False)
            # the forward passes above recorded an order of blocks on some ranks only (rank 0's previews, uneven
            # evaluation shares), which the next backward pass would prefetch by: forgotten on every rank (a root
            # that has never run a forward, e.g. an EMA not yet evaluated, has nothing to forget)
            if module._get_fsdp_state()._is_root:
                module.reset_iter_state()


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s whole state dict on the CPU. Sharded, every rank must call it (the shards are gathered); rank 0
    gets the tensors, the others an empty dict."""
    if not is_sharded(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def local_numel(tensors: Iterable[torch.Tensor]) -> int:
    """Elements this rank holds of ``tensors`` (its shard of a sharded one)."""
    from torch.distributed.tensor import DTensor

    return sum((t.to_local() if isinstance(t, DTensor) else t).numel() for t in tensors)


def optimizer_numel(optimizer: torch.optim.Optimizer) -> int:
    """Elements of the optimizer state this rank holds (AdamW's two moments: 2 per parameter of its shard)."""
    return local_numel(value for state in optimizer.state.values() for value in state.values()
                       if torch.is_tensor(value) and value.dim() > 0)


# ---------------------------------------------------------------------------------------------- state in and out


def _options(full: bool = False) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(flatten_optimizer_state_dict=True, full_state_dict=full)


def training_state(model: nn.Module, optimizer: torch.optim.Optimizer, by_name: bool) -> tuple[dict, dict]:
    """(model state, optimizer state) to checkpoint. ``by_name`` (a sharded checkpoint): keyed by parameter name,
    sharded tensors as this rank's shards, the optimizer's state flattened (``state.<name>.exp_avg``,
    ``param_groups.<name>.lr``), as PyTorch's distributed checkpoint saves them; else torch's own dicts."""
    if not by_name:
        return model.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_state_dict

    return get_state_dict(model, optimizer, options=_options())


def load_model_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Whole tensors into ``model``, sharded (each rank keeps its shards) or not."""
    if not is_sharded(model):
        model.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(model, state, options=_options(full=True))


def restore(checkpoint: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """A single-file checkpoint's model and optimizer state (whole tensors, torch's optimizer dict) into this
    run's ``model`` and ``optimizer``, sharded (each rank keeps its shards of the whole tensors) or not."""
    if not is_sharded(model):
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        return
    from torch.distributed.checkpoint.state_dict import set_state_dict
    from torch.distributed.tensor import DTensor, distribute_tensor

    model_state, optimizer_state = training_state(model, optimizer, by_name=True)
    whole = {**{f"model.{k}": v for k, v in checkpoint["model"].items()},
             **{f"optimizer.{k}": v for k, v in optimizer_by_name(checkpoint["optimizer"], optimizer, model).items()}}
    for prefix, state in (("model.", model_state), ("optimizer.", optimizer_state)):
        for name, target in state.items():
            value = whole.get(prefix + name, target)  # a parameter without optimizer state keeps its fresh one
            if isinstance(target, DTensor):  # this rank's shard of the whole tensor it holds (no communication)
                target.copy_(distribute_tensor(value.to(target.device), target.device_mesh, target.placements,
                                               src_data_rank=None))
            elif torch.is_tensor(target):
                target.copy_(value)
            else:
                state[name] = value
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state,
                   options=_options())


def restore_sharded(path: Any, model: nn.Module, optimizer: torch.optim.Optimizer,
                    sections: dict[str, dict[str, torch.Tensor]]) -> dict[str, Any]:
    """A sharded checkpoint folder into this run's ``model`` and ``optimizer`` (and into the tensors of
    ``sections``, e.g. a sharded EMA's), each rank reading what it holds, on any process count; returns the
    checkpoint's record (step, data position, random states...). Every rank calls it together."""
    from torch.distributed.checkpoint.state_dict import set_state_dict

    from .checkpoints import read_sharded

    model_state, optimizer_state = training_state(model, optimizer, by_name=True)
    checkpoint = read_sharded(path, {**sections, "model": model_state, "optimizer": optimizer_state})
    # a parameter that never had a gradient has no optimizer state in the checkpoint: it keeps its fresh one
    saved = checkpoint.get("optimizer", {})
    optimizer_state.update({name: value for name, value in saved.items() if name in optimizer_state})
    set_state_dict(model, optimizer, model_state_dict=checkpoint["model"], optim_state_dict=optimizer_state,
                   options=_options())
    return checkpoint


def optimizer_by_name(state: dict[str, Any], optimizer: torch.optim.Optimizer, model: nn.Module) -> dict[str, Any]:
    """torch's optimizer dict (state keyed by position in the parameter groups) → the flattened dict keyed by
    parameter name, for this run's ``optimizer`` over ``model`` (the same groups, in the same order)."""
    names = {id(parameter): name for name, parameter in model.named_parameters()}
    flat: dict[str, Any] = {}
    for saved, group in zip(state["param_groups"], optimizer.param_groups, strict=True):
        for index, parameter in zip(saved["params"], group["params"], strict=True):
            name = names[id(parameter)]
            for key, value in state["state"].get(index, {}).items():
                flat[f"state.{name}.{key}"] = value
            for key, value in saved.items():
                if key != "params":
                    flat[f"param_groups.{name}.{key}"] = value
    return flat
