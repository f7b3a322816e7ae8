"""Aspect-ratio bucketing: train each image at the shape closest to its own, not a square crop.

A bucket is a (width, height) in multiples of 64 whose area is at most ``resolution``²; each
image goes to the bucket with the nearest aspect ratio, is scaled to cover it and centre-cropped.
SDXL's added conditions take the real numbers: the original size, where the crop starts
(top, left, in the scaled image) and the target size (the bucket).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from PIL import Image

BUCKET_STEP = 64


@dataclass(frozen=True)
class Bucket:
    """A training shape in pixels."""

    width: int
    height: int

    @property
    def ratio(self) -> float:
        return self.width / self.height


@dataclass(frozen=True)
class FittedImage:
    """An image scaled and cropped to its bucket, with SDXL's size conditions."""

    image: Image.Image
    bucket: Bucket
    original_size: tuple[int, int]  # (height, width) of the source image
    crop_top_left: tuple[int, int]  # (top, left) in the scaled image

    @property
    def time_ids(self) -> tuple[int, int, int, int, int, int]:
        """SDXL ``add_time_ids``: original (h, w), crop (top, left), target (h, w)."""
        return (*self.original_size, *self.crop_top_left, self.bucket.height, self.bucket.width)


def make_buckets(resolution: int, step: int = BUCKET_STEP) -> list[Bucket]:
    """All buckets with sides in multiples of ``step`` between resolution/2 and 2x resolution.

    Each width gets the tallest height that keeps the area within ``resolution``²; the square
    bucket is always present. Sorted by aspect ratio.
    """
    if resolution < step or resolution % step:
        raise ValueError(f"resolution must be a multiple of {step} and at least {step}, got {resolution}")
    max_area = resolution * resolution
    min_side = max(step, (resolution // 2) // step * step)
    max_side = resolution * 2
    buckets = {Bucket(resolution, resolution)}
    for width in range(min_side, max_side + 1, step):
        height = min(max_side, (max_area // width) // step * step)
        if height >= min_side:
            buckets.add(Bucket(width, height))
    return sorted(buckets, key=lambda b: (b.ratio, b.width))


def assign_bucket(width: int, height: int, buckets: list[Bucket]) -> Bucket:
    """The bucket whose aspect ratio is nearest (in log space) to width/height; larger wins ties."""
    target = math.log(width / height)
    return min(buckets, key=lambda b: (round(abs(math.log(b.ratio) - target), 9), -b.width * b.height))


def fit_to_bucket(image: Image.Image, bucket: Bucket) -> FittedImage:
    """Scale ``image`` to cover ``bucket`` and centre-crop it there."""
    src_w, src_h = image.size
    scale = max(bucket.width / src_w, bucket.height / src_h)
    new_w = max(bucket.width, round(src_w * scale))
    new_h = max(bucket.height, round(src_h * scale))
    resized = image.resize((new_w, new_h), Image.Resampling.BICUBIC) if (new_w, new_h) != image.size else image
    left = (new_w - bucket.width) // 2
    top = (new_h - bucket.height) // 2
    cropped = resized.crop((left, top, left + bucket.width, top + bucket.height))
    return FittedImage(cropped, bucket, (src_h, src_w), (top, left))
