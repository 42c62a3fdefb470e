"""What one sample may cost: the largest shard member read and the largest image decoded, so that a hostile or
broken file costs bounded memory in every process that reads it (loader workers, make-shards, predict).

The limits are process-wide settings (like ``remote.configure``): the command line sets them once in the main
process, before any loader process starts, and forked processes inherit them.
"""

from __future__ import annotations

DEFAULT_MAX_MEMBER_BYTES = 256 * 2**20  # far above any real image file; a gzip bomb's member is far above it
DEFAULT_MAX_IMAGE_PIXELS = 100_000_000  # 100 MP (× bands): the largest real imagery, not a decompression bomb

max_member_bytes = DEFAULT_MAX_MEMBER_BYTES
max_image_pixels = DEFAULT_MAX_IMAGE_PIXELS


class SampleTooLarge(ValueError):
    """A member or image over a limit: a bad sample (skipped and counted by the readers), not a crash."""


def configure(member_bytes: int | None = None, image_pixels: int | None = None) -> None:
    """Sets the limits of this process and of the processes it forks from now on."""
    global max_member_bytes, max_image_pixels
    if member_bytes is not None:
        max_member_bytes = int(member_bytes)
    if image_pixels is not None:
        max_image_pixels = int(image_pixels)


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
