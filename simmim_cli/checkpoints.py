"""Checkpoints: plain tensors and Python values, written atomically, read with ``weights_only=True``.

A checkpoint is a dict::

    {"format_version": 1, "kind": "pretrain", "config": {...}, "model": state_dict,
     "optimizer": ..., "scaler": ..., "step": int, "epoch": int, "rng": {...}}

Nothing in it is a pickled object, so loading one from a stranger can never run code.

A sharded run (``--shard-model``) writes the same dict as a folder, ``checkpoint-NNNNNNNN.dcp/``: its tensors
(model, optimizer, EMA: each rank its own shards) in PyTorch's distributed checkpoint format (DCP, ``.metadata``
and ``__R_0.distcp`` files), everything else in ``run.pth``. It loads onto any number of processes (resharded), and
:func:`load_checkpoint` reads it in one process, without the optimizer, as if it were a ``.pth``.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import pickle
import random
import re
import shutil
import socket
import warnings
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import storage
from .errors import SimmimError

FORMAT_VERSION = 1
CHECKPOINT_PATTERN = re.compile(r"checkpoint-(\d+)\.(?:pth|dcp)$")
RUN_RECORD = "run.pth"  # in a sharded checkpoint folder: everything but the sharded tensors


def checkpoint_name(step: int, sharded: bool = False) -> str:
    return f"checkpoint-{step:08d}.{'dcp' if sharded else 'pth'}"


def is_sharded_checkpoint(path: str | Path) -> bool:
    """A folder written by a sharded run (or a copy of one, complete or not)."""
    path = Path(path)
    return path.is_dir() and ((path / RUN_RECORD).exists() or (path / ".metadata").exists())


def checkpoint_bytes(path: Path) -> int:
    """The size of a checkpoint file, or of all the files of a checkpoint folder."""
    if path.is_dir():
        return sum(p.stat().st_size for p in path.iterdir() if p.is_file())
    return path.stat().st_size


def remove_checkpoint(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()


def save_checkpoint(state: dict[str, Any], path: Path, then: str = "", needed: int | None = None) -> None:
    """Writes to a temporary file in the same folder, flushed to the disk, then renames: a crash never leaves half a
    checkpoint, and processes on several machines writing the same file to a shared folder do not mix their bytes.

    A failed write removes the temporary file; a full disk, a quota, a read-only or forbidden folder raise
    :class:`~simmim_cli.storage.StorageError` (``then`` is added to its message; ``needed``: the bytes it says the
    file needs, by default those of the tensors)."""
    path = Path(path)
    state = on_cpu(state)
    tmp = path.with_name(f".{path.name}.{socket.gethostname()}-{os.getpid()}.tmp")
    with storage.writing(path, needed=needed or state_bytes(state), temporary=tmp, then=then):
        # an open file rather than a path: torch then reports the file's OSError (errno) behind its RuntimeError
        with open(tmp, "wb") as file:
            torch.save({"format_version": FORMAT_VERSION, **state}, file)
            file.flush()
            os.fsync(file.fileno())  # a quota or a full disk of a network file system may only show here
        os.replace(tmp, path)


def on_cpu(value: Any) -> Any:
    """A (nested) state with its tensors on the CPU, so that a checkpoint written on a GPU loads with a plain
    ``torch.load`` on a machine without one (CPU tensors are not copied)."""
    if torch.is_tensor(value):
        return value.cpu()
    if isinstance(value, dict):
        copied = copy.copy(value)  # the same mapping type, with its attributes (a state_dict's version _metadata)
        for key, item in value.items():
            copied[key] = on_cpu(item)
        return copied
    if isinstance(value, list):
        return [on_cpu(item) for item in value]
    if isinstance(value, tuple):
        return tuple(on_cpu(item) for item in value)
    return value


def state_bytes(value: Any) -> int:
    """The bytes of the tensors in a (nested) state: about the size of its checkpoint file."""
    if torch.is_tensor(value):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(state_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(state_bytes(v) for v in value)
    return 0


class PickledConfig:
    """Stands in for a configuration object that a published checkpoint pickled next to its weights (the
    official SimMIM checkpoints hold a yacs ``CfgNode``, others an ``argparse.Namespace``): unpickling makes an
    inert OrderedDict instead (its items and attributes are the config's data), so no code of the original
    class ever runs, and torch's weights-only unpickler accepts it."""

    def __new__(cls, *args: Any, **kwargs: Any) -> OrderedDict:  # type: ignore[misc]
        return OrderedDict()


# classes that may appear in published checkpoints and are read as PickledConfig; anything else is refused
TOLERATED_GLOBALS = ("yacs.config.CfgNode", "argparse.Namespace")


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Reads a checkpoint without unpickling arbitrary objects (``torch.load(weights_only=True)``)."""
    path = Path(path)
    if is_sharded_checkpoint(path):
        return read_sharded(path, skip=("optimizer",))
    if not path.is_file():
        raise SimmimError(f"checkpoint {path} not found")
    try:
        try:
            checkpoint = torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError:
            unsafe = _unsafe_globals(path)
            if not unsafe or not set(unsafe) <= set(TOLERATED_GLOBALS):
                raise
            with torch.serialization.safe_globals([(PickledConfig, name) for name in unsafe]):
                checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        names = _unsafe_globals(path)
        what = f" ({', '.join(names[:3])})" if names else ""
        raise SimmimError(f"refusing to load {path}: it holds Python objects other than tensors and plain "
                          f"values{what}, which could run code; only load checkpoints saved as plain state dicts"
                          ) from error
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        raise SimmimError(f"{path} is not a readable PyTorch checkpoint ({str(error).splitlines()[0]}); "
                          "it may be truncated or corrupt") from error
    if not isinstance(checkpoint, dict):
        raise SimmimError(f"{path} holds a {type(checkpoint).__name__}, not a checkpoint dict")
    return checkpoint


def _unsafe_globals(path: Path) -> list[str]:
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # legacy (non-zip) files cannot be listed
        return []


def list_checkpoints(directory: Path) -> list[Path]:
    """Numbered checkpoints in a run directory, oldest first."""
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := CHECKPOINT_PATTERN.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(directory: Path) -> Path | None:
    checkpoints = list_checkpoints(directory)
    return checkpoints[-1] if checkpoints else None


def prune_checkpoints(directory: Path, keep: int) -> tuple[int, int]:
    """Deletes all but the newest ``keep`` (at least one) numbered checkpoints; returns (checkpoints, bytes freed)."""
    removed = freed = 0
    for path in list_checkpoints(directory)[:-max(keep, 1)]:
        with contextlib.suppress(FileNotFoundError):
            size = checkpoint_bytes(path)
            remove_checkpoint(path)
            removed, freed = removed + 1, freed + size
    return removed, freed


class RunCheckpoints:
    """The numbered checkpoints of a run folder, saved so that a filling disk never costs the newest one.

    Before each save the free space is compared with the size of the last checkpoint: when it is short, the
    checkpoints beyond ``keep`` go first (the newest is never touched), and one warning says early when the disk
    will not hold the next two. After a save, all but the newest ``keep`` are deleted.

    ``sharded``: every rank calls :meth:`save` and writes its shards (:func:`save_sharded`); rank 0 alone minds
    the space. Otherwise rank 0 alone calls it."""

    def __init__(self, directory: Path, keep: int, say: Callable[[str], None], sharded: bool = False):
        self.directory, self.keep, self.say, self.sharded = Path(directory), keep, say, sharded
        self.warned = False

    def save(self, state: dict[str, Any], path: Path, then: str = "") -> None:
        if self.sharded:
            if _is_main():
                self._make_room(state)
            save_sharded(state, path, then)
        else:
            save_checkpoint(state, path, then, self._make_room(state))
        if _is_main():
            prune_checkpoints(self.directory, self.keep)

    def _make_room(self, state: dict[str, Any]) -> int:
        """Prunes before the save when the disk is short; returns the bytes a checkpoint needs."""
        last = latest_checkpoint(self.directory)
        needed = checkpoint_bytes(last) if last is not None else state_bytes(state)
        free = storage.free_bytes(self.directory)
        if free is not None and free < needed:
            removed, freed = prune_checkpoints(self.directory, self.keep - 1)
            if removed:
                self.say(f"note: {storage.human_bytes(free)} free in {self.directory}, less than a checkpoint "
                         f"({storage.human_bytes(needed)}): removed the {removed} oldest checkpoint(s) before saving "
                         f"({storage.human_bytes(freed)})")
                free = storage.free_bytes(self.directory)
        if free is not None and free < 2 * needed and not self.warned:
            self.warned = True
            self.say(f"warning: {storage.human_bytes(free)} free in {self.directory}: room for fewer than the next two "
                     f"checkpoints ({storage.human_bytes(needed)} each); free space there soon, or the run stops at a "
                     "save (with the newest checkpoint kept, to resume from)")
        return needed


def newest_run_checkpoint(runs_root: Path, command: str) -> Path | None:
    """The newest checkpoint of any ``runs/<command>-*`` directory (by file time)."""
    candidates = [c for run in runs_root.glob(f"{command}-*") if (c := latest_checkpoint(run)) is not None]
    return max(candidates, key=lambda p: p.stat().st_mtime) if candidates else None


def rng_state() -> dict[str, Any]:
    """Every random generator the training process uses, as plain values."""
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": _numpy_state_to_plain(np.random.get_state()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_to_tuple(state["python"]))
    np.random.set_state(_numpy_state_from_plain(state["numpy"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _numpy_state_to_plain(state: tuple) -> list:
    name, keys, pos, has_gauss, cached = state
    return [name, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss), float(cached)]


def _numpy_state_from_plain(state: list) -> tuple:
    name, keys, pos, has_gauss, cached = state
    return name, np.asarray(keys.numpy(), dtype=np.uint32), pos, has_gauss, cached


def _to_tuple(value: Any) -> Any:
    """Python's random state is nested tuples; a round trip may turn them into lists."""
    return tuple(_to_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def strip_prefixes(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Removes wrappers' prefixes (DDP's ``module.``, torch.compile's ``_orig_mod.``)."""
    cleaned = {}
    for key, value in state_dict.items():
        for prefix in ("module.", "_orig_mod."):
            while key.startswith(prefix):
                key = key[len(prefix):]
        cleaned[key.replace("._orig_mod.", ".")] = value
    return cleaned


# ---------------------------------------------------------------------------------------------- sharded checkpoints


def _is_main() -> bool:
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


def split_sharded(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(the tensors of ``state``'s sections, keyed ``section/name``; the rest, with ``sharded_sections`` naming
    the sections). A section is a top-level dict holding tensors (model, flattened optimizer, EMA)."""
    tensors: dict[str, torch.Tensor] = {}
    record: dict[str, Any] = {"sharded_sections": []}
    for key, value in state.items():
        if isinstance(value, dict) and any(torch.is_tensor(v) for v in value.values()):
            tensors.update({f"{key}/{name}": v for name, v in value.items() if torch.is_tensor(v)})
            record[key] = {name: v for name, v in value.items() if not torch.is_tensor(v)}
            record["sharded_sections"].append(key)
        else:
            record[key] = value
    return tensors, record


def save_sharded(state: dict[str, Any], path: Path, then: str = "") -> None:
    """Every rank calls this with its part of ``state`` (its shards, the same plain values): the ranks write
    their shards into one temporary folder (named by rank 0), rank 0 adds ``run.pth`` and renames the folder
    when all is written, so that a checkpoint folder is complete or not there. A failed write on any rank raises a
    :class:`~simmim_cli.storage.StorageError` on every rank, and the temporary folder is removed."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    path = Path(path)
    tensors, record = split_sharded(state)
    holder = [f".{path.name}.{socket.gethostname()}-{os.getpid()}.tmp"]
    if dist.is_initialized():
        dist.broadcast_object_list(holder, src=0)
    tmp = path.with_name(holder[0])
    try:
        with storage.writing(path, needed=state_bytes(tensors), then=then):
            try:
                with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
                    warnings.simplefilter("ignore", UserWarning)
                    dcp.save(tensors, storage_writer=dcp.FileSystemWriter(tmp, sync_files=True),
                             no_dist=not dist.is_initialized())
            except CheckpointException as error:  # every rank gets the failures of all: the first one's cause
                raise _first_failure(error) from None
            if _is_main():
                with open(tmp / RUN_RECORD, "wb") as file:
                    torch.save({"format_version": FORMAT_VERSION, **on_cpu(record)}, file)
                    file.flush()
                    os.fsync(file.fileno())
                _replace(tmp, path)
    except BaseException:
        if _is_main():
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def _first_failure(error: BaseException) -> BaseException:
    failures = [failure[0] for failure in getattr(error, "failures", {}).values()]
    storage_faults = [failure for failure in failures if storage.os_error_in(failure) is not None]
    return (storage_faults or failures or [RuntimeError(str(error))])[0]


def _replace(tmp: Path, path: Path) -> None:
    """``tmp`` (a folder) becomes ``path``; one that is there already is replaced."""
    if path.exists():
        old = path.with_name(f".{path.name}.{os.getpid()}.old.tmp")
        os.replace(path, old)
        os.replace(tmp, path)
        remove_checkpoint(old)
    else:
        os.replace(tmp, path)


# what a DCP .metadata file may hold: its own dataclasses, torch sizes, dtypes and layouts, a path
_METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "TensorStorageMetadata", "BytesStorageMetadata",
                                              "ChunkStorageMetadata", "MetadataIndex", "TensorProperties",
                                              "StorageMeta", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "pathlib": {"Path", "PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
}


class _MetadataUnpickler(pickle.Unpickler):
    """DCP's index is a pickle; this reads it without ever making an object of another class (no code runs)."""

    def find_class(self, module: str, name: str) -> Any:
        allowed = name in _METADATA_CLASSES.get(module, ()) or (
            module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)))
        if not allowed:
            raise pickle.UnpicklingError(f"{module}.{name}")
        return super().find_class(module, name)


def _reader(path: Path) -> Any:
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            with open(Path(self.path) / ".metadata", "rb") as file:
                metadata = _MetadataUnpickler(file).load()
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(path)


def _incomplete(path: Path, what: str) -> SimmimError:
    return SimmimError(f"sharded checkpoint {path} is incomplete: {what}; resume from an older checkpoint "
                       "(delete this folder) or copy it again")


def check_sharded(path: Path) -> tuple[dict[str, Any], Any]:
    """(run.pth's record, the DCP index) of a sharded checkpoint folder, after checking that every shard file it
    names is there and whole, and that no tensor claims more bytes than its files hold (a hostile index cannot make
    a reader allocate more memory than the folder's size). One line naming the file otherwise."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    for name in (".metadata", RUN_RECORD):
        if not (path / name).is_file():
            raise _incomplete(path, f"{name} is missing")
    try:
        with open(path / ".metadata", "rb") as file:
            metadata = _MetadataUnpickler(file).load()
    except pickle.UnpicklingError as error:
        raise SimmimError(f"refusing to load {path}: its .metadata holds Python objects other than a checkpoint "
                          f"index ({error}), which could run code") from error
    except (EOFError, OSError, ValueError, TypeError, AttributeError) as error:
        raise _incomplete(path, f".metadata is unreadable ({type(error).__name__})") from error
    stored: dict[str, int] = {}
    for index, info in metadata.storage_data.items():
        if Path(info.relative_path).name != info.relative_path or info.relative_path.startswith("."):
            raise SimmimError(f"refusing to load {path}: its index names a file outside the folder "
                              f"({info.relative_path})")
        shard = path / info.relative_path
        if not shard.is_file():
            raise _incomplete(path, f"its shard file {info.relative_path} is missing")
        if shard.stat().st_size < info.offset + info.length:
            raise _incomplete(path, f"its shard file {info.relative_path} is truncated ({shard.stat().st_size} of "
                              f"at least {info.offset + info.length} bytes)")
        stored[index.fqn] = stored.get(index.fqn, 0) + info.length
    for key, entry in metadata.state_dict_metadata.items():
        if isinstance(entry, TensorStorageMetadata):
            claimed = math.prod(entry.size) * torch.empty(0, dtype=entry.properties.dtype).element_size()
            if claimed > stored.get(key, 0):
                raise SimmimError(f"{path} is not a readable sharded checkpoint: its index says {key} holds "
                                  f"{claimed} bytes, its files {stored.get(key, 0)}")
    record = load_checkpoint(path / RUN_RECORD)
    return record, metadata


def read_sharded(path: Path, targets: dict[str, dict[str, torch.Tensor]] | None = None,
                 skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """A sharded checkpoint folder as the checkpoint dict it was saved from. The tensors of each section land in
    ``targets[section]`` where given (a sharded model's own state dict: each rank reads its shards, resharded to
    this run's process count; every rank calls it together), else in whole tensors on the CPU. Sections in
    ``skip`` are left out (a reader has no use for the optimizer's moments). Without ``targets`` each process
    reads alone (a reader on one rank of a job)."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    path = Path(path)
    record, metadata = check_sharded(path)
    wanted: dict[str, torch.Tensor] = {}
    for section in record.pop("sharded_sections", []):
        if section in skip:
            record.pop(section, None)
            continue
        live = (targets or {}).get(section)  # None: whole tensors
        tensors, extra = {}, []
        for key, entry in metadata.state_dict_metadata.items():
            if not key.startswith(f"{section}/") or not isinstance(entry, TensorStorageMetadata):
                continue
            name = key[len(section) + 1:]
            if live is not None and name not in live:
                extra.append(name)
                continue
            target = live[name] if live is not None else torch.empty(tuple(entry.size), dtype=entry.properties.dtype)
            if tuple(target.shape) != tuple(entry.size):
                raise SimmimError(f"{path} does not fit this model: {name} is {tuple(entry.size)} in the checkpoint "
                                  f"and {tuple(target.shape)} here; give the --model/--model-kwargs it was trained "
                                  "with")
            tensors[name] = wanted[key] = target
        missing = [name for name in live or {} if name not in tensors]
        # the optimizer has no state for a parameter that never had a gradient: it keeps its fresh one
        if section != "optimizer" and (missing or extra):
            raise SimmimError(f"{path} does not fit this model: {len(missing)} of its {section} tensors missing "
                              f"({', '.join(missing[:2])}), {len(extra)} left over ({', '.join(extra[:2])}); give "
                              "the --model/--model-kwargs it was trained with")
        record[section] = {**record.get(section, {}), **tensors}
    try:
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(wanted, storage_reader=_reader(path), no_dist=not (targets and dist.is_initialized()))
    except (CheckpointException, RuntimeError, AssertionError, pickle.UnpicklingError) as error:
        cause = _first_failure(error) if isinstance(error, CheckpointException) else error
        line = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
        raise SimmimError(f"{path} is not a readable sharded checkpoint ({line}); a shard file may be corrupt"
                          ) from None
    return record

