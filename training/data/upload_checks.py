"""Checks on an upload's raw bytes that its parsing library skips: a zip's entry count, a PNG's length.

Standard library only. ``precheck_zip`` reads a zip's end record and walks its central directory
by header lengths alone, so an archive with too many entries is refused before ``zipfile`` builds
one object per entry (300,000 empty entries cost it 254 MiB and 2.8 s). ``check_png_complete``
inflates a PNG's pixel data and compares its length with what the header's rows need: Pillow
stops quietly where the data ends and fills the rest of the image.
"""

from __future__ import annotations

import io
import struct
import zlib
from typing import BinaryIO

_EOCD_SIG = b"PK\x05\x06"
_EOCD_SIZE = 22
# A directory entry is 46 bytes plus its name, extra field and comment; 4 KiB is generous.
_MAX_CD_ENTRY_BYTES = 46 + 4096
_CHUNK = 1 << 20
# PNG colour type -> channels; Adam7 passes as (x0, y0, dx, dy).
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


class ZipRefused(Exception):
    """The archive holds more entries than allowed; the message says how many may."""


class TruncatedData(Exception):
    """The image's pixel data ends before its last row."""


def max_zip_entries(max_files: int) -> int:
    """Entries an archive may hold: the images, as many captions, and room for folders."""
    return 3 * max_files + 16


def precheck_zip(fileobj: BinaryIO, label: str, max_files: int) -> None:
    """Raise ``ZipRefused`` for too many entries (end record, then the raw directory); rewinds."""
    fileobj.seek(0, io.SEEK_END)
    tail_start = max(0, fileobj.tell() - _EOCD_SIZE - 0xFFFF)  # the record, then a comment of up to 64 KiB
    fileobj.seek(tail_start)
    tail = fileobj.read()
    pos = tail.rfind(_EOCD_SIG)
    if pos < 0 or len(tail) - pos < _EOCD_SIZE:
        fileobj.seek(0)
        return  # not a zip: zipfile says so
    count, cd_size, cd_offset = struct.unpack("<10xHII", tail[pos : pos + 20])
    eocd_at = tail_start + pos
    cd_end = eocd_at
    if count == 0xFFFF or cd_size == 0xFFFFFFFF or cd_offset == 0xFFFFFFFF:
        count, cd_size, cd_end = _zip64_counts(fileobj, eocd_at, count, cd_size, cd_end)
    allowed = max_zip_entries(max_files)
    if count > allowed:
        raise ZipRefused(
            f"{label} holds {count:,} entries; at most {allowed:,} ({max_files} images, as many "
            "captions, and folders); archive refused"
        )
    if cd_size > allowed * _MAX_CD_ENTRY_BYTES:
        raise ZipRefused(f"{label}: its directory of files is {cd_size / 2**20:.1f} MiB, too large for "
                         f"{allowed:,} entries; archive refused")
    fileobj.seek(max(0, cd_end - cd_size))
    _count_cd_entries(fileobj.read(cd_size), label, allowed)
    fileobj.seek(0)


def _zip64_counts(fileobj: BinaryIO, eocd_at: int, count: int, cd_size: int, cd_end: int) -> tuple[int, int, int]:
    """(entries, directory size, where the directory ends) from the zip64 end record, if any."""
    if eocd_at < 20:
        return count, cd_size, cd_end
    fileobj.seek(eocd_at - 20)
    if fileobj.read(4) != b"PK\x06\x07":
        return count, cd_size, cd_end
    record_at = eocd_at - 20 - 56  # the zip64 end record sits right before its locator
    if record_at < 0:
        return count, cd_size, cd_end
    fileobj.seek(record_at)
    record = fileobj.read(56)
    if record[:4] != b"PK\x06\x06":
        return count, cd_size, cd_end
    total, size = struct.unpack("<QQ", record[32:48])
    return total, size, record_at


def _count_cd_entries(directory: bytes, label: str, allowed: int) -> None:
    """Count directory headers by their lengths alone: catches an end record that understates them."""
    pos, count = 0, 0
    while pos + 46 <= len(directory) and directory[pos : pos + 4] == b"PK\x01\x02":
        count += 1
        if count > allowed:
            raise ZipRefused(f"{label} holds more than {allowed:,} entries; archive refused")
        name_len, extra_len, comment_len = struct.unpack("<HHH", directory[pos + 28 : pos + 34])
        pos += 46 + name_len + extra_len + comment_len


def check_png_complete(data: bytes, width: int, height: int) -> None:
    """Raise ``TruncatedData`` when a PNG's IDAT data inflates to fewer bytes than its rows need.

    ``data`` is a PNG Pillow has opened (so its IHDR comes first and is sane).
    """
    depth, colour, interlace = data[24], data[25], data[28]
    bits = _PNG_CHANNELS.get(colour, 4) * depth
    if interlace:
        passes = [(-(-(width - x0) // dx), -(-(height - y0) // dy)) for x0, y0, dx, dy in _ADAM7]
        needed = sum(ph * (1 + -(-pw * bits // 8)) for pw, ph in passes if pw > 0 and ph > 0)
    else:
        needed = height * (1 + -(-width * bits // 8))
    inflater, got, pos = zlib.decompressobj(), 0, 8
    while pos + 8 <= len(data) and got < needed:
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        if kind == b"IDAT":
            chunk = data[pos + 8 : pos + 8 + length]
            while chunk and got < needed:  # bounded steps: never holds the whole image twice
                got += len(inflater.decompress(chunk, _CHUNK))
                chunk = inflater.unconsumed_tail
        elif kind == b"IEND":
            break
        pos += 12 + length
    if got < needed:
        row_bytes = needed / max(1, height)
        raise TruncatedData(f"truncated image: its pixel data ends after about {int(got / row_bytes)} of "
                            f"{height} rows")
