"""SDXL's trained sizes: the one table behind the bot's aspect choices and the engine's size presets."""

from __future__ import annotations

from typing import NamedTuple


class SizePreset(NamedTuple):
    """One of SDXL's aspect-ratio buckets (about one megapixel each)."""

    aspect: str  # what /imagine offers ("2:3")
    name: str  # what a request or the command line may say instead of WIDTHxHEIGHT ("portrait")
    width: int
    height: int


SDXL_SIZES: tuple[SizePreset, ...] = (
    SizePreset("1:1", "square", 1024, 1024),
    SizePreset("4:5", "portrait-3-4", 896, 1152),
    SizePreset("2:3", "portrait", 832, 1216),
    SizePreset("9:16", "tall", 768, 1344),
    SizePreset("5:4", "landscape-4-3", 1152, 896),
    SizePreset("3:2", "landscape", 1216, 832),
    SizePreset("16:9", "wide", 1344, 768),
)
SIZES_BY_ASPECT: dict[str, tuple[int, int]] = {p.aspect: (p.width, p.height) for p in SDXL_SIZES}
SIZES_BY_NAME: dict[str, tuple[int, int]] = {p.name: (p.width, p.height) for p in SDXL_SIZES}
