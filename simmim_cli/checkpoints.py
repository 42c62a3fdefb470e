"""Checkpoints: plain tensors and Python values, written atomically, read with ``weights_only=True``.

A checkpoint is a dict::

    {"format_version": 1, "kind": "pretrain", "config": {...}, "model": state_dict,
     "optimizer": ..., "scaler": ..., "step": int, "epoch": int, "rng": {...}}

Nothing in it is a pickled object, so loading one from a stranger can never run code.
"""

from __future__ import annotations

import contextlib
import copy
import os
import pickle
import random
import re
import socket
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import storage
from .errors import SimmimError

FORMAT_VERSION = 1
CHECKPOINT_PATTERN = re.compile(r"checkpoint-(\d+)\.pth$")


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step:08d}.pth"


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
    """Deletes all but the newest ``keep`` (at least one) numbered checkpoints; returns (files, bytes freed)."""
    removed = freed = 0
    for path in list_checkpoints(directory)[:-max(keep, 1)]:
        with contextlib.suppress(FileNotFoundError):
            size = path.stat().st_size
            path.unlink()
            removed, freed = removed + 1, freed + size
    return removed, freed


class RunCheckpoints:
    """The numbered checkpoints of a run folder, saved so that a filling disk never costs the newest one.

    Before each save the free space is compared with the size of the last checkpoint: when it is short, the
    checkpoints beyond ``keep`` go first (the newest is never touched), and one warning says early when the disk
    will not hold the next two. After a save, all but the newest ``keep`` are deleted."""

    def __init__(self, directory: Path, keep: int, say: Callable[[str], None]):
        self.directory, self.keep, self.say = Path(directory), keep, say
        self.warned = False

    def save(self, state: dict[str, Any], path: Path, then: str = "") -> None:
        last = latest_checkpoint(self.directory)
        needed = last.stat().st_size if last is not None else state_bytes(state)
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
        save_checkpoint(state, path, then, needed)
        prune_checkpoints(self.directory, self.keep)


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
