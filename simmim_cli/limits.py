"""What one sample may cost: the largest shard member read and the largest image decoded, so that a hostile or
broken file costs bounded memory in every process that reads it (loader workers, make-shards, predict).

The limits are process-wide settings (like ``remote.configure``): the command line sets them once in the main
process, before any loader process starts; forked processes inherit them, and spawned ones (``--gpus``/``--nproc``
workers, make-shards' checking processes) read them from the environment this module sets.
"""

from __future__ import annotations

import os

DEFAULT_MAX_MEMBER_BYTES = 256 * 2**20  # far above any real image file; a gzip bomb's member is far above it
DEFAULT_MAX_IMAGE_PIXELS = 100_000_000  # 100 MP (× bands): the largest real imagery, not a decompression bomb
_MEMBER_ENV, _PIXELS_ENV = "SIMMIM_MAX_MEMBER_BYTES", "SIMMIM_MAX_IMAGE_PIXELS"  # for the processes started later

max_member_bytes = int(os.environ.get(_MEMBER_ENV) or DEFAULT_MAX_MEMBER_BYTES)
max_image_pixels = int(os.environ.get(_PIXELS_ENV) or DEFAULT_MAX_IMAGE_PIXELS)


class SampleTooLarge(ValueError):
    """A member or image over a limit: a bad sample (skipped and counted by the readers), not a crash."""


def configure(member_bytes: int | None = None, image_pixels: int | None = None) -> None:
    """Sets the limits of this process and of the processes it forks from now on."""
    global max_member_bytes, max_image_pixels
    if member_bytes is not None:
        max_member_bytes = int(member_bytes)
        os.environ[_MEMBER_ENV] = str(max_member_bytes)
    if image_pixels is not None:
        max_image_pixels = int(image_pixels)
        os.environ[_PIXELS_ENV] = str(max_image_pixels)


def check_member_size(size: int, name: str = "member") -> None:
    """Raises :class:`SampleTooLarge` for a member larger than the limit, before it is read."""
    if size > max_member_bytes:
        raise SampleTooLarge(f"{name} is {size / 2**20:.0f} MB, over the limit of {max_member_bytes / 2**20:.0f} MB "
                             "per sample (--max-sample-mb)")


def check_image_size(width: int, height: int, bands: int = 1, name: str = "image") -> None:
    """Raises :class:`SampleTooLarge` for an image whose pixels (× bands beyond the first three) exceed the limit,
    from its header, before it is decoded."""
    pixels = int(width) * int(height) * max(1, -(-int(bands) // 3))
    if pixels > max_image_pixels:
        raise SampleTooLarge(f"{name} is {width}×{height}" + (f"×{bands}" if bands > 3 else "")
                             + f", over the limit of {max_image_pixels / 1e6:g} megapixels (--max-image-pixels)")


# ---------------------------------------------------------------------------------------------- resource options

MAX_SAMPLE_MB = 64 * 1024  # --max-sample-mb above this holds a member no loader process could keep in memory


def usable_cores() -> int:
    """The CPU cores this process may use (its affinity: SLURM's --cpus-per-task, taskset), else the machine's."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def check_processes(option: str, value: int | None, minimum: int = 0) -> None:
    """``--workers``/``--nproc``: between ``minimum`` and the cores there are (more processes than cores only
    queue for them, and a typo such as 1000 would fork until the machine stops)."""
    from .errors import SimmimError

    if value is None:
        return
    cores = usable_cores()
    if value < minimum:
        raise SimmimError(f"{option} must be at least {minimum}, got {value}")
    if value > cores:
        raise SimmimError(f"{option} {value} is more than the {cores} CPU core(s) this process may use; give at most "
                          f"{cores} (each process needs a core of its own)")


def check_settings(max_sample_mb: float, max_image_pixels: float) -> None:
    """``--max-sample-mb`` and ``--max-image-pixels``: positive, and a member limit a process can hold."""
    from .errors import SimmimError

    if not 0 < max_sample_mb <= MAX_SAMPLE_MB:
        raise SimmimError(f"--max-sample-mb must be above 0 and at most {MAX_SAMPLE_MB} (64 GB), got "
                          f"{max_sample_mb:g}; the default 256 is far above any real image")
    if max_image_pixels < 1:
        raise SimmimError(f"--max-image-pixels must be at least 1, got {max_image_pixels:g}; the default 100e6 "
                          "(100 megapixels) fits real imagery")


def configure_from(config) -> None:
    """The limits of a command's config (``max_sample_mb``, ``max_image_pixels``), checked, for this process and
    the processes it starts."""
    check_settings(config.max_sample_mb, config.max_image_pixels)
    configure(int(config.max_sample_mb * 2**20), int(config.max_image_pixels))
