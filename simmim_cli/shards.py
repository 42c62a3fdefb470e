"""WebDataset shards on disk: writing them from image folders (make-shards), finding them, describing them
(``_info.json``, sample counts, class names) and DALI's index files beside them. How a command's ``--data``
becomes shards (an image folder cached as shards, labels required) is ``data_sources.py``.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import multiprocessing as mp
import os
import random
import signal
import sys
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import braceexpand
import webdataset as wds
from PIL import Image

from . import limits, remote, storage, tars
from .errors import SimmimError
from .image_formats import FORMAT_EXTENSIONS, ImageFacts, SetSurvey, array_facts, require, sniff
from .redact import redact
from .remote_faults import describe

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".ppm", ".pgm", ".pbm", ".dcm",
                  ".npy"}
KEPT_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}  # stored as their original bytes
INFO_FILE = "_info.json"
DALI_INDEX_VERSION = "v1.2"  # the index format of DALI's fn.readers.webdataset (as its wds2idx tool writes it)

# ---------------------------------------------------------------------------------------------- shards


@dataclass
class ShardSet:
    """Shard URLs with what is known of them (sample counts from ``_info.json``, class names)."""

    urls: list[str]
    num_samples: int
    classes: list[str] | None = None
    shard_lengths: list[int] = field(default_factory=list)
    images: dict | None = None  # _info.json's record of the images: channels, dtype, statistics (image_formats.py)

    @property
    def num_classes(self) -> int | None:
        return len(self.classes) if self.classes is not None else None


def read_info(directory: Path) -> dict | None:
    """A shard folder's ``_info.json``, checked (None when it has none)."""
    path = directory / INFO_FILE
    if not path.is_file():
        return None
    try:
        data = path.read_bytes()
    except OSError as error:
        raise SimmimError(f"cannot read {path}: {error}; re-create the shards with simmim make-shards") from error
    return parse_info(data, str(path))


def parse_info(data: bytes, where: str) -> dict:
    """``_info.json``'s bytes → its dict, checked: JSON text, an object whose splits, shard names, sample counts
    and class names have the types make-shards writes. Anything else is one line naming what is wrong."""
    try:
        info = json.loads(data)
    except ValueError as error:  # not JSON, or not UTF-8 text
        raise SimmimError(f"cannot read {where}: {str(error).splitlines()[0]}; re-create the shards with simmim "
                          "make-shards") from None

    def wrong(what: str) -> SimmimError:
        return SimmimError(f"{where} is not a valid {INFO_FILE}: {what}; re-create the shards with simmim make-shards")

    if not isinstance(info, dict):
        raise wrong(f"it holds a JSON {type(info).__name__}, not an object")
    splits = info.get("splits", {})
    if not isinstance(splits, dict):
        raise wrong(f"'splits' is {json.dumps(splits)[:40]}, not an object of splits")
    for name, entry in splits.items():
        if not isinstance(entry, dict):
            raise wrong(f"split '{name}' is {json.dumps(entry)[:40]}, not an object")
        filenames, lengths = entry.get("filenames", []), entry.get("shard_lengths", [])
        if not isinstance(filenames, list) or not all(isinstance(f, str) and f for f in filenames):
            raise wrong(f"the filenames of split '{name}' are not a list of shard names")
        if not isinstance(lengths, list) or not all(_count(n) for n in lengths):
            raise wrong(f"the shard_lengths of split '{name}' are not a list of sample counts")
        if "num_samples" in entry and not _count(entry["num_samples"]):
            raise wrong(f"the num_samples of split '{name}' is not a sample count")
    classes = info.get("classes")
    if classes is not None and (not isinstance(classes, list) or not all(isinstance(c, str) for c in classes)):
        raise wrong("'classes' is not a list of class names")
    images = info.get("images")
    if images is not None:
        _check_image_record(images, wrong)
    return info


MAX_CHANNELS = 1024  # hyperspectral cubes have a few hundred bands; a record beyond this is no image set


def _check_image_record(images, wrong) -> None:
    """The ``images`` record (image_formats.py) has the types make-shards writes: a channel count, a dtype name,
    and per-channel numbers and band names, one per channel."""
    if not isinstance(images, dict):
        raise wrong("'images' is not an object")
    channels = images.get("channels")
    if not _count(channels) or not 1 <= channels <= MAX_CHANNELS:
        raise wrong(f"the images' channels are {json.dumps(channels)[:20]}, not a count from 1 to {MAX_CHANNELS}")
    if not isinstance(images.get("dtype", "uint8"), str):
        raise wrong("the images' dtype is not a type name")
    for key in ("mean", "std"):
        values = images.get(key)
        if values is not None and (not isinstance(values, list) or len(values) != channels or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)):
            raise wrong(f"the images' {key} is not {channels} finite number(s), one per channel")
    names = images.get("band_names")
    if names is not None and (not isinstance(names, list) or len(names) != channels
                              or not all(isinstance(n, str) for n in names)):
        raise wrong(f"the images' band_names are not {channels} name(s), one per channel")


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _listed_location(folder: str, name: str, where: str) -> str:
    """Where a shard that ``_info.json`` lists is: a relative path inside the shard folder, or (in a remote folder)
    a URL of the same store. Anything else (an absolute path, ``..``, a ``pipe:`` command, another host) is
    refused: a shard folder names its own files, nothing else on the machine or the network."""
    remote_folder = remote.is_url(folder)
    if "://" in name or name.startswith("pipe:"):
        if remote_folder and name.split("/", 3)[:3] == folder.rstrip("/").split("/", 3)[:3]:
            return name  # the same scheme and host (or bucket)
    else:
        parts = name.replace("\\", "/").split("/")
        if not name.startswith(("/", "~")) and ".." not in parts and ":" not in parts[0]:
            return f"{folder.rstrip('/')}/{name}" if remote_folder else str(Path(folder) / name)
    raise SimmimError(f"{where} lists '{redact(name)}', which is not a file inside its folder; a shard folder's "
                      f"{INFO_FILE} names its own shards by relative path: re-create the shards with simmim "
                      "make-shards")


def _check_listed(urls: list[str], folder: str, where: str) -> None:
    """Stops at the start when shards ``_info.json`` lists do not exist (local folders, and buckets that can be
    listed), naming the first ones, rather than counting each as corrupt in the middle of the run."""
    if remote.is_url(folder):
        present = remote.listing(folder)
        missing = [] if present is None else [u for u in urls if remote.url_path(u) not in present]
    else:
        missing = [u for u in urls if not Path(u).is_file()]
    if missing:
        names = ", ".join(redact(remote.url_path(u)).rsplit("/", 1)[-1] for u in missing[:3])
        raise SimmimError(f"{where} lists {len(missing)} shard(s) that do not exist ({names}"
                          f"{', ...' if len(missing) > 3 else ''}); copy the whole make-shards output, or re-create "
                          "the shards with simmim make-shards")


def _info_split(info: dict, split: str | None) -> dict:
    splits = info.get("splits", {})
    if split is None:
        split = "train" if "train" in splits or len(splits) != 1 else next(iter(splits))
    if split not in splits:
        raise SimmimError(f"{INFO_FILE} has no split '{split}' (it has {sorted(splits)})")
    return splits[split]


def count_tar_samples(path: str) -> int:
    """Number of distinct sample keys in a local tar (reads headers only)."""
    keys = set()
    try:
        with tars.open_tar(path) as tar:
            for member in tar:
                if member.isreg() and not member.name.startswith("__"):
                    base = os.path.basename(member.name)
                    keys.add(os.path.join(os.path.dirname(member.name), base.split(".", 1)[0]))
    except (tarfile.TarError, OSError, EOFError) as error:
        lines = str(error).strip().splitlines()  # tarfile lists each compression it tried, one per line
        why = "it is empty" if os.path.getsize(path) == 0 else lines[0].rstrip(":") if lines else type(error).__name__
        raise SimmimError(f"{path} is not a readable tar file ({why}) and no "
                          f"{INFO_FILE} beside it says what it holds; re-create the shards with simmim make-shards"
                          ) from None
    return len(keys)


_NOTED: set[str] = set()  # optional _info.json files the store refused, already said


def _read_remote_info(folder_url: str, required: bool) -> dict | None:
    """``_info.json`` of a remote folder (None when it has none and it is not ``required``; one beside shards given
    explicitly that the store refuses, e.g. unsigned beside signed URLs, is left out with a note)."""
    url = f"{folder_url.rstrip('/')}/{INFO_FILE}"
    try:
        text = remote.read_bytes(url)
    except remote.RemoteError as error:
        if error.final and not required:
            if not error.missing and url not in _NOTED:
                _NOTED.add(url)  # once per process, not at each look at the shards
                print(f"note: cannot read {redact(url)} ({describe(error.__cause__ or error)}); reading the shards "
                      "given without it (--epoch-size N gives the sample count where it is needed)", file=sys.stderr)
            return None
        if error.missing:
            raise SimmimError(f"no {INFO_FILE} at {redact(url)}: a remote folder is read through the {INFO_FILE} "
                              "that make-shards writes; copy the whole make-shards output there, or give the shards "
                              "as a brace pattern such as s3://bucket/train-{000000..000099}.tar with --epoch-size N"
                              ) from None
        raise
    return parse_info(text, redact(url))


def _remote_folder(urls: list[str]) -> str | None:
    """The remote folder holding all ``urls`` (where an ``_info.json`` may describe them), or None."""
    folders = {remote.url_path(u).rsplit("/", 1)[0] for u in urls if remote.is_url(u) and not u.startswith("pipe:")}
    return folders.pop() if len(folders) == 1 and all(remote.is_url(u) for u in urls) else None


def resolve_shards(data: str, split: str | None = None, epoch_size: int | None = None,
                   count_required: bool = True) -> ShardSet:
    """Find shards from a directory, a brace pattern (``shards/train-{000000..000099}.tar``) or a list file, local
    or remote (``s3://``, ``gs://``, ``http(s)://``, ``pipe:``): a remote folder URL (``s3://bucket/train/``) is
    read through its ``_info.json``, and a pattern or list of URLs in one remote folder uses the ``_info.json``
    there when it has one.

    Sample counts come from ``_info.json`` next to the shards when present, else from reading tar headers
    (local files) or ``epoch_size``; with ``count_required`` False they may stay unknown (0).
    """
    path = Path(data)
    info = None
    shard_url = remote.url_path(data).endswith(".tar")  # also a signed one (.tar?X-Amz-...): a shard, not a folder
    if remote.is_url(data) and not data.startswith("pipe:") and "{" not in data and not shard_url:
        info = _read_remote_info(data, required=True)
        entry = _info_split(info, split)
        where = redact(f"{data.rstrip('/')}/{INFO_FILE}")
        urls = [_listed_location(data, name, where) for name in entry.get("filenames", [])]
        _check_listed(urls, data, where)
    elif path.is_dir():
        info = read_info(path)
        if info is not None:
            entry = _info_split(info, split)
            where = str(path / INFO_FILE)
            urls = [_listed_location(str(path), name, where) for name in entry.get("filenames", [])]
            _check_listed(urls, str(path), where)
        else:
            urls = sorted(str(p) for p in path.glob("*.tar"))
        if not urls:
            raise SimmimError(f"no .tar shards in {path}; make them with: simmim make-shards IMAGES {path}")
    elif not remote.is_url(data) and path.is_file() and path.suffix != ".tar":
        lines = [line.strip() for line in path.read_text().splitlines()]
        urls = [line if "://" in line or line.startswith(("pipe:", "/")) else str(path.parent / line)
                for line in lines if line and not line.startswith("#")]
        if not urls:
            raise SimmimError(f"the list file {path} names no shards; put one shard path or URL per line")
        if (folder := _remote_folder(urls)) is not None:
            info = _read_remote_info(folder, required=False)
    else:
        urls = list(braceexpand.braceexpand(data))
        local = [u for u in urls if not remote.is_url(u)]
        missing = [u for u in local if not Path(u).is_file()]
        if missing:
            raise SimmimError(f"shard not found: {missing[0]}; --data takes a shard directory, a brace pattern "
                              "like shards/train-{000000..000009}.tar or a file listing shards")
        info_dir = {Path(u).parent for u in local}
        if len(info_dir) == 1:
            info = read_info(info_dir.pop())
        elif (folder := _remote_folder(urls)) is not None:
            info = _read_remote_info(folder, required=False)

    classes = info.get("classes") if info else None
    lengths_by_name: dict[str, int] = {}
    if info is not None:
        for entry in info.get("splits", {}).values():
            lengths_by_name.update(zip(entry.get("filenames", []), entry.get("shard_lengths", []), strict=False))
    lengths = [lengths_by_name.get(remote.url_path(u).rsplit("/", 1)[-1]) for u in urls]
    if any(n is None for n in lengths):
        if epoch_size is None and not any(remote.is_url(u) for u in urls) and all(Path(u).is_file() for u in urls):
            lengths = [count_tar_samples(u) for u in urls]
        elif epoch_size is None and count_required:
            where = "the _info.json beside them does not list them" if info else "no _info.json is beside them"
            raise SimmimError(f"the number of samples in remote shards is unknown ({where}); give it with "
                              "--epoch-size N, or copy make-shards' _info.json next to them")
        else:
            lengths = []
    num_samples = epoch_size or sum(lengths)
    if num_samples <= 0 and (count_required or lengths):
        raise SimmimError(f"the shards in {redact(data)} hold no samples; re-create them with simmim make-shards")
    return ShardSet(urls=urls, num_samples=num_samples, classes=classes, shard_lengths=lengths,
                    images=info.get("images") if info else None)


def find_images(source: Path) -> tuple[list[tuple[Path, int | None]], list[str] | None]:
    """Image files of a folder: class sub-folders give labels, a flat folder gives none."""
    if not source.is_dir():
        raise SimmimError(f"{source} is not a folder of images")
    direct = sorted(p for p in source.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    folders = sorted(p for p in source.iterdir() if p.is_dir() and not p.name.startswith("."))
    nested = {d: sorted(p for p in d.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
              for d in folders}
    nested = {d: files for d, files in nested.items() if files}
    if direct and nested:
        raise SimmimError(f"{source} holds both images and class folders; put every image in a class folder "
                          "(labelled shards) or all in one flat folder (unlabelled shards)")
    if nested:
        classes = [d.name for d in nested]
        return [(f, label) for label, d in enumerate(nested) for f in nested[d]], classes
    if not direct:
        raise SimmimError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {source}")
    return [(f, None) for f in direct], None


def _sample_key(path: Path, source: Path, used: set[str]) -> str:
    # webdataset splits file names at the first dot, so keys must not contain any
    key = str(path.relative_to(source).with_suffix("")).replace(".", "_").replace(os.sep, "/")
    unique, n = key, 1
    while unique in used:
        unique, n = f"{key}_{n}", n + 1
    used.add(unique)
    return unique


def image_record(path: Path, statistics: bool = False) -> tuple[str, bytes, ImageFacts]:
    """(extension, bytes, facts) to store for an image: TIFF, DICOM, .npy, 16-bit PNG and JPEG/PNG/WebP bytes
    unchanged, other 8-bit pictures as lossless PNG. Images that are not 8-bit photos are decoded at full precision
    (``image_formats.py``), their per-channel moments measured when ``statistics``.

    Raises OSError/ValueError (from PIL) when the file does not decode completely, and
    :class:`limits.SampleTooLarge` for a file over ``--max-sample-mb`` (not read) or an image over
    ``--max-image-pixels`` (not decoded).
    """
    limits.check_member_size(path.stat().st_size, path.name)
    data = path.read_bytes()
    image_format = sniff(data)
    if image_format != "photo":
        return FORMAT_EXTENSIONS[image_format], data, array_facts(data, str(path), statistics)
    photo = ImageFacts((3, "uint8"), "photo")  # decoded as RGB by transforms.py, whatever the mode
    with Image.open(io.BytesIO(data)) as image:
        limits.check_image_size(*image.size, name=path.name)
        image_format = image.format
        if image_format == "JPEG":
            image.draft(image.mode, (64, 64))  # still parses the whole file, so truncation is caught
        image.load()
        if image_format in KEPT_FORMATS:
            return KEPT_FORMATS[image_format], data, photo
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return "png", buffer.getvalue(), photo


def write_shards(
    source: Path,
    output: Path,
    maxcount: int = 10000,
    max_size_mb: float = 100.0,
    shuffle: bool = True,
    seed: int = 0,
    split: str = "train",
    force: bool = False,
    on_progress: Callable[[int, int], None] | None = None,
    on_skip: Callable[[Path, str], None] | None = None,
    workers: int = 1,
    on_shard: Callable[[Path], None] | None = None,
    dali_indexes: bool = True,
    stats_images: int | None = None,
) -> dict:
    """Writes ``OUTPUT/{split}-000000.tar ...`` and ``OUTPUT/_info.json``; returns the info dict.

    A shard closes at ``maxcount`` samples or ``max_size_mb`` megabytes of image data, whichever comes first:
    100 MB holds about 1,000 ImageNet-like JPEGs, enough shards for every loader process of a cluster job.

    Each shard is written to a temporary name and renamed when complete (then passed to ``on_shard``, which may
    move it elsewhere). Unreadable images are passed to ``on_skip`` and left out. ``workers`` processes read and
    check the images; one writes them in order, so the output is the same for any number of workers.

    ``_info.json`` records the images (``images``): channels, dtype, formats, band names and, for images other
    than 8-bit photos, exact per-channel mean, std and value range over every image, or over ``stats_images``
    of them drawn with ``seed``. Images of different kinds (channels, dtype) in one set stop it.
    """
    files, classes = find_images(source)
    suffixes = {path.suffix.lower() for path, _ in files}
    for suffix, module in ((".tif", "tifffile"), (".tiff", "tifffile"), (".dcm", "pydicom")):
        if suffix in suffixes:
            require(module)  # here, once, rather than in every worker
    with storage.writing(output):
        output.mkdir(parents=True, exist_ok=True)
    storage.report_stale_temporaries(output, (f"{split}-*.tar.tmp", ".*.tmp"))
    existing = sorted(output.glob(f"{split}-*.tar"))
    if existing and not force:
        raise SimmimError(f"{output} already holds {split} shards ({existing[0].name}, ...); "
                          "pass --force to replace them or choose another output folder")
    with storage.writing(output):
        _forget_split(output, split)  # from here until the set is complete, _info.json does not list this split
        for old in existing:
            old.unlink()
            dali_index_path(old).unlink(missing_ok=True)
    if shuffle:
        random.Random(seed).shuffle(files)
    sampled = stats_images is not None and stats_images < len(files)
    measured = (set(random.Random(seed).sample(range(len(files)), stats_images)) if sampled
                else range(len(files)))
    items = [(path, label, index in measured) for index, (path, label) in enumerate(files)]
    survey = SetSurvey()

    used_keys: set[str] = set()
    filenames, lengths, skipped = [], [], []
    writer, shard_path, count, size = None, None, 0, 0

    def close_shard():
        nonlocal writer, count, size
        if writer is not None:
            writer.close()
            writer = None
            shard_path.with_suffix(".tar.tmp").rename(shard_path)
            filenames.append(shard_path.name)
            lengths.append(count)
            count, size = 0, 0
            if on_shard is not None:
                on_shard(shard_path)

    try:
        for index, (path, label, record, problem) in enumerate(_checked_records(items, workers)):
            if record is None:
                skipped.append(str(path))
                if on_skip:
                    on_skip(path, problem)
            else:
                extension, data, facts = record
                survey.add(str(path), facts)
                if writer is None:
                    shard_path = output / f"{split}-{len(filenames):06d}.tar"
                    # a fixed member time: the same images give the same bytes, whenever and however written
                    writer = wds.TarWriter(str(shard_path.with_suffix(".tar.tmp")), mtime=0)
                sample = {"__key__": _sample_key(path, source, used_keys), extension: data}
                if label is not None:
                    sample["cls"] = label
                writer.write(sample)
                count += 1
                size += len(data)
                if count >= maxcount or size >= max_size_mb * 1e6:
                    close_shard()
            if on_progress:
                on_progress(index + 1, len(files))
        close_shard()
        for name in filenames if dali_indexes else []:  # for --decode gpu: DALI reads shards through these
            write_dali_index(output / name)
        if not filenames:
            raise SimmimError(f"none of the {len(files)} images in {source} could be read")
        info = read_info(output) or {}
        info.setdefault("name", output.name)
        info.setdefault("splits", {})[split] = {
            "name": split, "num_samples": sum(lengths), "filenames": filenames, "shard_lengths": lengths,
        }
        if classes is not None:
            info["classes"] = classes
            info["num_classes"] = len(classes)
        info["skipped"] = skipped
        info["images"] = survey.record(sampled, seed)
        write_info(output, info)  # last: only a complete set is listed
    except BaseException as error:
        # nothing half done stays: the partial shard and the shards written so far (a set without its _info.json
        # entry would be read as if complete) go, and the space they took is free again
        if writer is not None:
            with contextlib.suppress(Exception):
                writer.close()
        written = [shard_path.with_suffix(".tar.tmp")] if shard_path is not None else []
        written += [output / name for name in filenames] + [dali_index_path(output / name) for name in filenames]
        freed = sum(path.stat().st_size for path in written if path.is_file())
        for path in written:
            path.unlink(missing_ok=True)
        fault = storage.storage_error(
            error, shard_path or output,
            then=f"removed the partial shard and the {len(filenames)} complete one(s) of this unfinished set "
                 f"({storage.human_bytes(freed)} freed, {INFO_FILE} does not list them); run the same command again "
                 "once there is room") if isinstance(error, Exception) else None
        if fault is None:
            raise
        raise fault from error
    return info


def write_remote_shards(source: Path, url: str, split: str = "train", force: bool = False, **options) -> dict:
    """:func:`write_shards` to a bucket (``s3://bucket/train/``): each shard is uploaded when it is complete and its
    local copy removed (one shard on local disk at a time), and ``_info.json`` (with the other splits already
    listed there) goes last, so readers only ever see a complete set. DALI index files are made where the data is
    read (``--shard-cache``)."""
    url = url.rstrip("/")
    info = _read_remote_info(url, required=False) or {}
    if split in info.get("splits", {}) and not force:
        raise SimmimError(f"{url} already holds {split} shards (its {INFO_FILE} lists them); pass --force to replace "
                          "them or choose another output folder")

    def upload(shard: Path) -> None:
        remote.upload(f"{url}/{shard.name}", shard)
        shard.unlink()

    with tempfile.TemporaryDirectory(prefix="simmim-make-shards-") as tmp:
        written = write_shards(source, Path(tmp), split=split, force=True, on_shard=upload, dali_indexes=False,
                               **options)
    info.setdefault("name", url.rsplit("/", 1)[-1])
    info.setdefault("splits", {})[split] = written["splits"][split]
    info.update({key: written[key] for key in ("classes", "num_classes", "skipped", "images") if key in written})
    remote.upload(f"{url}/{INFO_FILE}", data=json.dumps(info, indent=2).encode())  # last: a complete set
    return info


def _checked_record(item: tuple[Path, int | None, bool]) -> tuple[Path, int | None, tuple | None, str]:
    path, label, statistics = item
    try:
        return path, label, image_record(path, statistics), ""
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as error:
        return path, label, None, str(error) or type(error).__name__


def _checked_records(files: list[tuple[Path, int | None, bool]], workers: int) -> Iterator[tuple]:
    """(path, label, (extension, bytes, facts) or None, why not) of each (path, label, measure it) file, in order:
    decoding every image to check it is what takes the time, so ``workers`` processes do it, and the results come
    back in the files' order."""
    if workers <= 1 or len(files) < 2:
        yield from map(_checked_record, files)
        return
    # forkserver: the workers fork from a fresh single-threaded server, never from this process, whose other threads
    # (fsspec's IO loop, tqdm's monitor) may hold a lock at the fork that the child would then wait on forever
    method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
    context = mp.get_context(method)
    if method == "forkserver":
        context.set_forkserver_preload([__name__])  # imported once in the server (webdataset pulls in torch: 3 s)
    with context.Pool(workers, initializer=_default_signals) as pool:
        yield from pool.imap(_checked_record, files, chunksize=8)
        pool.close()
        pool.join()  # the workers end on their own; Pool's exit would otherwise terminate them


def _default_signals() -> None:
    """A forked worker inherits the parent's signal handlers (a training run's, the launcher's), with which
    SIGTERM would not end it: the pool's workers take the defaults, and leave Ctrl-C to the parent."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def write_info(output: Path, info: dict) -> None:
    """Writes a shard folder's ``_info.json`` (whole, or not at all)."""
    storage.write_text(output / INFO_FILE, json.dumps(info, indent=2))


def _forget_split(output: Path, split: str) -> None:
    """Takes ``split`` out of ``_info.json`` (deleting the file when no split is left)."""
    info = read_info(output)
    if info is None or split not in info.get("splits", {}):
        return
    del info["splits"][split]
    if info["splits"]:
        write_info(output, info)
    else:
        (output / INFO_FILE).unlink()


# ---------------------------------------------------------------------------------------------- DALI index files


def dali_index_path(shard: str | Path) -> Path:
    """Where a shard's DALI index lives: ``train-000000.tar`` → ``train-000000.idx`` beside it."""
    return Path(shard).with_suffix(".idx")


def write_dali_index(shard: str | Path, check: Callable[[str, bytes], None] | None = None) -> list[str]:
    """Writes the shard's index for DALI's webdataset reader and returns the samples left out.

    The format: a line ``v1.2 <samples>``, then one line per sample listing each of its files as
    ``<extension> <data offset> <size> <file name>``; a sample is the run of consecutive files that share a
    name up to the first dot of the base name, as webdataset groups them. ``check(extension, data)`` may
    raise ``OSError``/``ValueError`` for a file that will not decode: its whole sample is left out of the
    index, so DALI never reads it (DALI stops the whole pipeline at an undecodable image).
    """
    samples: list[tuple[str, list[str]]] = []  # (key, ["ext offset size name", ...])
    left_out: dict[str, str] = {}  # key → why
    with tars.open_tar(str(shard)) as tar:
        for member in tar:
            if not member.isreg() or os.path.basename(member.name).startswith("__"):
                continue
            directory, base = os.path.split(member.name)
            stem, _, extension = base.partition(".")
            key = os.path.join(directory, stem)
            if not samples or samples[-1][0] != key:
                samples.append((key, []))
            if check is not None and key not in left_out:
                try:
                    limits.check_member_size(member.size, member.name)  # before it is read
                    check(extension, tar.extractfile(member).read())
                except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
                    left_out[key] = f"{type(error).__name__}: {error}"
            samples[-1][1].append(f"{extension} {member.offset_data} {member.size} {base}")
    kept = [files for key, files in samples if key not in left_out]
    path = dali_index_path(shard)
    storage.write_text(path, f"{DALI_INDEX_VERSION} {len(kept)}\n" + "".join(" ".join(files) + "\n" for files in kept))
    return [f"{shard}:{key}: {why}" for key, why in left_out.items()]


def read_dali_index_count(shard: str | Path) -> int | None:
    """Samples in the shard's DALI index, or None when it is missing or older than the shard."""
    path = dali_index_path(shard)
    if not path.is_file() or path.stat().st_mtime < Path(shard).stat().st_mtime:
        return None
    with path.open() as index:
        version, _, count = index.readline().partition(" ")
    return int(count) if version == DALI_INDEX_VERSION and count.strip().isdigit() else None
