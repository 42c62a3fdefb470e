"""Several training sources in one run: how ``--data`` names them and their shares, and how many samples of each an
epoch holds. Which sample comes when is the epoch order's business (``epoch_order.Mixture``); turning the sources
into one shard list is ``data_sources.training_shards``.

A source is what ``--data`` takes alone (a shard folder or URL, a brace pattern, a list file, a folder of images),
with an optional share after a final ``::``: ``30%`` (a proportion of every epoch), ``0.5x`` or ``3x`` (passes
over the source per epoch) or ``20000`` (samples per epoch). A source without a share is read once per epoch.
``--data sources.yaml`` names many: a list of ``{path, proportion | passes | samples, name}``. In a run's
config.yaml the sources are written in that list form.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from .errors import SimmimError
from .redact import redact

KINDS = ("proportion", "passes", "samples")
SEPARATOR = "::"  # never in a path or URL we read (IPv6 hosts are bracketed and followed by a path)
SHARE = re.compile(r"(?P<proportion>-?[0-9]*\.?[0-9]+)%|(?P<passes>-?[0-9]*\.?[0-9]+)x|(?P<samples>-?[0-9]+)")
SHARE_HELP = ("write a proportion of the epoch as 30%, passes over the source per epoch as 0.5x or 3x, or samples "
              "per epoch as a whole number such as 20000")


@dataclass(frozen=True)
class SourceSpec:
    """One ``--data`` source: where it is, its share (``kind`` None: one pass per epoch) and the name it is
    reported under."""

    path: str
    kind: str | None = None  # proportion | passes | samples
    value: float = 1.0  # a fraction of the epoch, passes, or samples
    name: str = ""

    def share(self) -> str:
        if self.kind == "proportion":
            return f"{self.value * 100:.4g}% of each epoch"
        if self.kind == "passes":
            return f"{self.value:g} passes per epoch"
        if self.kind == "samples":
            return f"{int(self.value)} samples per epoch"
        return "one pass per epoch"

    def as_dict(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"path": self.path}
        if self.kind is not None:
            entry[self.kind] = int(self.value) if self.kind == "samples" else self.value
        entry["name"] = self.name
        return entry


def _is_yaml_file(text: str) -> bool:
    return text.lower().endswith((".yaml", ".yml")) and "://" not in text


def _from_text(text: str, option: str) -> SourceSpec:
    path, found, share = text.rpartition(SEPARATOR)
    if not found or "/" in share:  # no share (a ``::`` inside a URL's bracketed host is followed by a path)
        return SourceSpec(text)
    match = SHARE.fullmatch(share.strip())
    if match is None:
        raise SimmimError(f"{option} {redact(text)}: '{share}' is not a share; {SHARE_HELP}")
    kind = match.lastgroup
    value = float(match.group(kind)) / (100 if kind == "proportion" else 1)
    return SourceSpec(path, kind, value)


def _from_entry(entry: Any, where: str, base: Path | None) -> SourceSpec:
    if isinstance(entry, str):
        return SourceSpec(entry)
    shares = [key for key in KINDS if key in entry] if isinstance(entry, dict) else []
    unknown = sorted(set(entry) - {"path", "name", *KINDS}) if isinstance(entry, dict) else []
    if not isinstance(entry, dict) or not isinstance(entry.get("path"), str) or len(shares) > 1 or unknown:
        raise SimmimError(f"{where}: each source is a path, or a mapping with path and at most one of proportion, "
                          f"passes, samples (and a name); got {redact(repr(entry))}")
    path = entry["path"]
    if base is not None and "://" not in path and not path.startswith(("/", "pipe:")):
        path = str(base / path)  # relative to the YAML file, as a list file's lines
    kind = shares[0] if shares else None
    value = entry[kind] if kind else 1.0
    if kind and (isinstance(value, bool) or not isinstance(value, (int, float)) or
                 (kind == "samples" and value != int(value))):
        what = "a whole number of samples" if kind == "samples" else "a number"
        raise SimmimError(f"{where}: {kind} of {redact(path)} must be {what}, got {value!r}")
    return SourceSpec(path, kind, float(value), str(entry.get("name") or ""))


def _from_yaml(text: str, option: str) -> list[SourceSpec]:
    path = Path(text)
    if not path.is_file():
        raise SimmimError(f"{option} {text}: no such file; a YAML file of sources lists them as path and share")
    try:
        entries = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise SimmimError(f"{option} {text} is not valid YAML: {str(error).splitlines()[0]}") from error
    if not isinstance(entries, list) or not entries:
        raise SimmimError(f"{option} {text}: a YAML file of sources is a list, one entry per source, e.g. "
                          "'- {path: ours/}' and '- {path: s3://bucket/general/, proportion: 0.3}'")
    return [_from_entry(entry, f"{option} {text}", path.parent) for entry in entries]


def parse(data: str | list | None, option: str = "--data") -> list[SourceSpec]:
    """The sources ``data`` names (a string, a list of strings and mappings, YAML files of sources), with their
    shares and distinct names; shares are checked for what can be checked before any source is read."""
    items = [] if data is None else [data] if isinstance(data, (str, dict)) else list(data)
    specs: list[SourceSpec] = []
    for item in items:
        if isinstance(item, str) and _is_yaml_file(item):
            specs += _from_yaml(item, option)
        elif isinstance(item, str):
            specs.append(_from_text(item, option))
        else:
            specs.append(_from_entry(item, option, None))
    seen: set[str] = set()
    for spec in specs:
        if spec.path.rstrip("/") in seen:
            raise SimmimError(f"{option} {redact(spec.path)} is given twice; give each source once, with its share")
        seen.add(spec.path.rstrip("/"))
    names: dict[str, int] = {}
    named = []
    for spec in specs:
        name = spec.name or default_name(spec.path)
        names[name] = names.get(name, 0) + 1
        named.append(replace(spec, name=name if names[name] == 1 else f"{name}#{names[name]}"))
    check_shares(named, option)
    return named


def default_name(path: str) -> str:
    """What a source is called in reports: its folder's (or file's) name, without a cache suffix (and never a
    URL's query string or user:password@)."""
    path = re.sub(r"^([A-Za-z][A-Za-z0-9+.-]*://)[^/@]*@", r"\1", re.sub(r"[?#].*$", "", path))
    parts = [part for part in path.rstrip("/").split("/") if part and "{" not in part and not part.endswith(":")]
    name = parts[-1] if parts else path
    for suffix in (".simmim-shards", ".tar", ".txt"):
        name = name.removesuffix(suffix)
    return name or path


def is_mixture(data: str | list | None) -> bool:
    """More than one source, or a share given: the epoch is made as a mixture."""
    specs = parse(data)
    return len(specs) > 1 or any(spec.kind is not None for spec in specs)


def normalize(data: str | list | None) -> str | list[dict[str, Any]] | None:
    """``--data`` as a config keeps it: one source without a share as its path, a mixture as a list of mappings
    (path, share, name), the form a YAML file of sources and a run's config.yaml share."""
    specs = parse(data)
    if not specs:
        return None
    if len(specs) == 1 and specs[0].kind is None:
        return specs[0].path
    return [spec.as_dict() for spec in specs]


def map_paths(data: str | list | None, function: Callable[[str], str]) -> str | list[dict[str, Any]] | None:
    """``data`` with each source's path replaced by ``function(path)``, shares and names kept."""
    specs = parse(data)
    if len(specs) == 1 and specs[0].kind is None:
        return function(specs[0].path)
    return [replace(spec, path=function(spec.path)).as_dict() for spec in specs] or None


def check_shares(specs: list[SourceSpec], option: str = "--data") -> None:
    """The shares' errors that need no source read: a share of 0 or less, proportions over the whole epoch,
    proportions that leave room nobody fills or that leave none for a source giving passes or samples."""
    for spec in specs:
        if spec.value <= 0:
            raise SimmimError(f"{option} {redact(spec.path)}: a share of {spec.value:g} ({spec.kind}) gives it no "
                              "samples; give a share above 0, or leave the source out")
    proportions = [spec for spec in specs if spec.kind == "proportion"]
    if not proportions:
        return
    total = math.fsum(spec.value for spec in proportions)
    others = [spec for spec in specs if spec.kind != "proportion"]
    if total > 1 + 1e-9:
        raise SimmimError(f"the proportions of the {option} sources add up to {total:.4g} ({total * 100:.4g}%), more "
                          "than a whole epoch; lower them so that they add up to at most 100%")
    if others and total > 1 - 1e-9:
        raise SimmimError(f"the proportions of the {option} sources take the whole epoch, leaving no room for "
                          f"{others[0].name} ({others[0].share()}); lower the proportions, or give it a proportion "
                          "too")
    if not others and total < 1 - 1e-9:
        raise SimmimError(f"the proportions of the {option} sources add up to {total * 100:.4g}%, not 100%, and no "
                          "source fills the rest; make them add up to 100%, or give one source no share (it is read "
                          "once per epoch and the proportions are taken of the epoch it makes)")


def plan(specs: list[SourceSpec], sizes: list[int], epoch_size: int | None = None,
         option: str = "--data") -> list[int]:
    """Samples each source gives per epoch, for sources of ``sizes`` samples: passes and samples as given (one
    pass without a share); proportions of the epoch these make (``F / (1 - proportions)``), or, where every source
    gives a proportion, of ``epoch_size`` or of all the sources' samples. Proportions are rounded so that the
    counts add up to the epoch (largest remainders)."""
    fixed: dict[int, int] = {}
    for index, (spec, size) in enumerate(zip(specs, sizes, strict=True)):
        if spec.kind == "proportion":
            continue
        count = {"passes": round(spec.value * size), "samples": int(spec.value)}.get(spec.kind, size)
        if count < 1:
            raise SimmimError(f"{option} {redact(spec.path)}: {spec.share()} of its {size} samples is less than one "
                              "sample per epoch; give it a larger share")
        fixed[index] = count
    if epoch_size is not None and fixed:
        spec = specs[next(iter(fixed))]
        raise SimmimError(f"--epoch-size sets the length of an epoch whose {option} sources all give proportions; "
                          f"{spec.name} gives {spec.share()}: drop --epoch-size (the shares make the epoch)")
    proportional = [index for index, spec in enumerate(specs) if spec.kind == "proportion"]
    if not proportional:
        return [fixed[index] for index in range(len(specs))]
    share = math.fsum(specs[index].value for index in proportional)
    epoch = round(sum(fixed.values()) / (1 - share)) if fixed else (epoch_size or sum(sizes))
    room = epoch - sum(fixed.values())
    ideal = [room * specs[index].value / share for index in proportional]
    counts = [math.floor(value) for value in ideal]
    by_remainder = sorted(range(len(ideal)), key=lambda k: (counts[k] - ideal[k], k))
    for k in by_remainder[:room - sum(counts)]:
        counts[k] += 1
    for k, index in enumerate(proportional):
        if counts[k] < 1:
            spec = specs[index]
            raise SimmimError(f"{option} {redact(spec.path)}: {spec.value * 100:.4g}% of an epoch of {epoch} samples "
                              "is less than one sample; give it a larger proportion")
        fixed[index] = counts[k]
    return [fixed[index] for index in range(len(specs))]
