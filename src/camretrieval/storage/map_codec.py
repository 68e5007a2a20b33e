"""The compressed block of one image's maps (maps format 2, :mod:`camretrieval.storage.maps`): lossless, about 37 kB
for the 1280 x 266 float16 values (681 kB) of a 448 px image with efficientnet_lite0.

What the measurement said (``benchmarks/map_entropy.py``, clutter-dev at 448 px): 95% of lite0's head activations are
exactly 0 and only 0.1% exactly 6; the order-0 entropy of the float16 values is 0.91 bits per value (41 kB per image).
The other values carry almost all of it: 12.6 bits each, their low byte (the last 8 mantissa bits) is uniform noise.
So a block stores the non-zero values and where they are, and leaves the values as they are:

- the positions of the values whose float16 bit pattern is not 0, in channel-major order (channel k, then cell), as
  the gaps between successive positions, one byte each, a gap of 255 or more as bytes of 255 followed by the rest
  (a channel's activations come in spatial runs, so most gaps are 1 and compress well);
- the high and the low bytes of those values' bit patterns, as two planes (sign, exponent and 2 mantissa bits
  compress to 4.6 bits; the low byte does not compress);

each section compressed by zstd (level 3, with a checksum, so a damaged block is an error, never wrong maps). A
layer where more than 2/3 of the values are non-zero (a layer without ReLU) is stored dense instead: the high and
low byte planes of all values, cell-major. Both are exact: a block decodes to the very float16 bits written (-0.0,
negative values and NaN included). The CroW counts of positive cells per channel (Eq. 2) are computed from the
decoded values, exactly as from the float16 maps, and cost one pass over the non-zero values.

A block begins with a 32-byte header (magic, kind, height, width, channels, number of stored values, the three
section lengths), so that it decodes on its own: one image's maps are read without reading any other.
"""

from __future__ import annotations

import struct
import threading
from dataclasses import dataclass

import numpy as np
import zstandard

from camretrieval.errors import CamRetrievalError

BLOCK_MAGIC = b"CRM2"
# magic, kind, height, width, channels, stored values, lengths of the three sections (bytes)
BLOCK_HEADER = struct.Struct("<4sBxHHxxIIIII")
SPARSE, DENSE = 0, 1
ZSTD_LEVEL = 3
# Stored sparse when at most this fraction of the values is non-zero: a non-zero value costs about 3 bytes raw (a
# gap byte and two value bytes), a dense value 2.
SPARSE_LIMIT = 2 / 3
_POSITIVE_INFINITY = 0x7C00  # float16 bit patterns 1 .. 0x7C00 are the positive numbers (0x7C01.. are NaN)

_local = threading.local()


class MapsDamagedError(CamRetrievalError):
    """A stored block of maps does not decode (a damaged or truncated file)."""


def _compressor() -> zstandard.ZstdCompressor:
    if not hasattr(_local, "compressor"):  # a zstd context is not shared between threads
        _local.compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_checksum=True, write_content_size=True)
    return _local.compressor


def _decompressor() -> zstandard.ZstdDecompressor:
    if not hasattr(_local, "decompressor"):
        _local.decompressor = zstandard.ZstdDecompressor()
    return _local.decompressor


def gap_code(positions: np.ndarray) -> np.ndarray:
    """Increasing positions (int64, from 0) as gap bytes: gap g = p_i - p_(i-1) (p_-1 = -1) is written as g // 255
    bytes of 255 and one byte g % 255. Inverse of :func:`gap_decode`."""
    gaps = np.diff(np.asarray(positions, dtype=np.int64), prepend=-1)
    fills = gaps // 255
    code = np.full(len(gaps) + int(fills.sum()), 255, dtype=np.uint8)
    code[np.cumsum(fills + 1) - 1] = (gaps - 255 * fills).astype(np.uint8)
    return code


def gap_decode(code: np.ndarray) -> np.ndarray:
    """Positions from gap bytes: the running sum at each byte that is not 255, minus one."""
    return np.cumsum(code, dtype=np.int64)[code != 255] - 1


def _planes(bits: np.ndarray) -> tuple[bytes, bytes]:
    return (bits >> 8).astype(np.uint8).tobytes(), (bits & 0xFF).astype(np.uint8).tobytes()


def encode_block(cells: np.ndarray, height: int, width: int) -> bytes:
    """The block of one layer of one image: ``cells`` (height*width x K, float16, cell-major)."""
    cells = np.asarray(cells)
    if cells.dtype != np.float16 or cells.ndim != 2 or cells.shape[0] != height * width:
        raise CamRetrievalError(f"a maps block takes {height * width} x K float16 cells, got {cells.dtype} {cells.shape}")
    channels = cells.shape[1]
    by_channel = np.ascontiguousarray(cells.T).reshape(-1).view(np.uint16)
    positions = np.flatnonzero(by_channel)
    compress = _compressor().compress
    if len(positions) <= SPARSE_LIMIT * by_channel.size:
        kind, count = SPARSE, len(positions)
        high, low = _planes(by_channel[positions])
        sections = [compress(gap_code(positions).tobytes()), compress(high), compress(low)]
    else:
        kind, count = DENSE, by_channel.size
        high, low = _planes(np.ascontiguousarray(cells).reshape(-1).view(np.uint16))
        sections = [compress(b""), compress(high), compress(low)]
    header = BLOCK_HEADER.pack(BLOCK_MAGIC, kind, height, width, channels, count, *(len(s) for s in sections))
    return header + b"".join(sections)


@dataclass
class BlockHeader:
    kind: int
    height: int
    width: int
    channels: int
    count: int
    lengths: tuple[int, int, int]

    @property
    def size(self) -> int:
        """The whole block's bytes."""
        return BLOCK_HEADER.size + sum(self.lengths)


def read_header(buffer: np.ndarray | bytes, offset: int = 0) -> BlockHeader:
    """The header of the block at ``offset`` of ``buffer``; a clear error when it is not one."""
    if offset < 0 or offset + BLOCK_HEADER.size > len(buffer):
        raise MapsDamagedError(f"a block at byte {offset} of a {len(buffer)}-byte file: truncated")
    magic, kind, height, width, channels, count, *lengths = BLOCK_HEADER.unpack_from(buffer, offset)
    if magic != BLOCK_MAGIC or kind not in (SPARSE, DENSE):
        raise MapsDamagedError(f"no maps block at byte {offset} (magic {magic!r}, kind {kind})")
    header = BlockHeader(kind, height, width, channels, count, tuple(lengths))
    if offset + header.size > len(buffer):
        raise MapsDamagedError(f"the block at byte {offset} needs {header.size} bytes, the file ends before: truncated")
    return header


def _section(data: memoryview, expected: int, limit: int | None = None) -> np.ndarray:
    """One zstd section as bytes: ``expected`` of them (or, ``limit`` given, at most that many)."""
    try:
        declared = zstandard.frame_content_size(data)
        if declared < 0 or declared > (limit if limit is not None else expected):
            raise MapsDamagedError(f"a section declares {declared} bytes, {expected if limit is None else limit} at most")
        raw = _decompressor().decompress(data)
    except zstandard.ZstdError as error:
        raise MapsDamagedError(f"a compressed section does not decode ({error})") from error
    if (limit is None and len(raw) != expected) or (limit is not None and len(raw) > limit):
        raise MapsDamagedError(f"a section decodes to {len(raw)} bytes, {expected} expected")
    return np.frombuffer(raw, dtype=np.uint8)


@dataclass
class DecodedBlock:
    """A block's stored values as float16 bit patterns: ``bits`` at flat ``positions`` of the channel-major
    (K x cells) array (sparse), or all values cell-major (``positions`` None: dense)."""

    header: BlockHeader
    bits: np.ndarray
    positions: np.ndarray | None


def decode_block(buffer: np.ndarray | bytes, offset: int, height: int, width: int, channels: int) -> DecodedBlock:
    """Decode the block at ``offset`` of ``buffer``, which must hold ``height`` x ``width`` x ``channels`` values."""
    header = read_header(buffer, offset)
    if (header.height, header.width, header.channels) != (height, width, channels):
        raise MapsDamagedError(
            f"the block at byte {offset} holds {header.height} x {header.width} x {header.channels} maps, "
            f"the table says {height} x {width} x {channels}"
        )
    values = height * width * channels
    if header.count > values or (header.kind == DENSE and header.count != values):
        raise MapsDamagedError(f"the block at byte {offset} claims {header.count} of {values} values")
    view = memoryview(buffer)[offset + BLOCK_HEADER.size : offset + header.size]
    first, second, _ = header.lengths
    high = _section(view[first : first + second], header.count)
    low = _section(view[first + second :], header.count)
    bits = (high.astype(np.uint16) << 8) | low
    if header.kind == DENSE:
        return DecodedBlock(header, bits, None)
    positions = gap_decode(_section(view[:first], 0, limit=header.count + values // 255 + 1))
    if len(positions) != header.count or (len(positions) and (positions[-1] >= values or positions[0] < 0)):
        raise MapsDamagedError(f"the block at byte {offset} holds positions that do not fit its maps")
    return DecodedBlock(header, bits, positions)


def is_positive(bits: np.ndarray) -> np.ndarray:
    """Which float16 bit patterns are positive numbers (not 0, -0.0, negative or NaN): what Eq. 2 counts."""
    return (bits > 0) & (bits <= _POSITIVE_INFINITY)


def positive_counts(channel: np.ndarray, bits: np.ndarray, channels: int) -> np.ndarray:
    """Eq. 2's count per channel (K, int32) of a sparse block: the stored values (float16 ``bits``, each in channel
    ``channel``) that are positive numbers."""
    return np.bincount(channel[is_positive(bits)], minlength=channels).astype(np.int32)


def decode_into(block: DecodedBlock, out: np.ndarray) -> np.ndarray:
    """Write a decoded block's maps into ``out`` (cells x K, float32 or float16, cell-major) and return the number
    of cells where each channel is positive (K, int32: Eq. 2's count, from the stored values)."""
    cells, channels = out.shape
    if block.positions is None:
        out[...] = block.bits.view(np.float16).reshape(cells, channels)
        return np.count_nonzero(is_positive(block.bits).reshape(cells, channels), axis=0).astype(np.int32)
    if not out.flags.c_contiguous:
        raise CamRetrievalError("decode_into writes into a contiguous array")
    channel = block.positions // cells
    out.fill(0)
    out.reshape(-1)[(block.positions - channel * cells) * channels + channel] = block.bits.view(np.float16).astype(out.dtype)
    return positive_counts(channel, block.bits, channels)


def channel_major(block: DecodedBlock, cells: int, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """A decoded block's non-zero values as (flat positions in the channel-major K x cells array, increasing; their
    float16 bit patterns): what sparse online aggregation reads, without writing out the zeros."""
    if block.positions is not None:
        return block.positions, block.bits
    by_channel = np.ascontiguousarray(block.bits.reshape(cells, channels).T).reshape(-1)  # a dense block
    positions = np.flatnonzero(by_channel)
    return positions, by_channel[positions]
