"""The DICOM file meta group, parsed by hand, and bounded inflation of Deflated data sets.

pydicom inflates a Deflated Explicit VR Little Endian data set (transfer syntax
1.2.840.10008.1.2.1.99) in one ``zlib.decompress`` call: a 1.67 MB file of
zeros becomes gigabytes before anything is checked. Here the file meta group
(always explicit VR little endian) is parsed from the first bytes without
pydicom, and the data set is inflated in 1 MiB steps
(``zlib.decompressobj(...).decompress(data, max_length)``) into a private
temporary file that pydicom then reads as plain Explicit VR Little Endian:
first up to :data:`HEADER_BUDGET` bytes for the header, then only as far as the
end of the first frame the header declares (whose size the pixel budget
:data:`~cxrviewer.core.io._common.MAX_PIXELS` already bounds). Nothing past
that is ever inflated, so memory stays at one step and disk at header + one frame.
"""
from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field

from ..errors import CorruptFileError, UnsupportedFormatError

DEFLATED_EXPLICIT = "1.2.840.10008.1.2.1.99"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
#: Bytes at the start of a file searched for the file meta group.
META_READ = 64 * 1024
#: Most bytes of an inflated data set read as its header (a radiograph's header is a few KiB).
HEADER_BUDGET = 2 * 2**20
#: Largest output of one inflation step.
STEP = 2**20
_LONG_VR = {b"OB", b"OW", b"OF", b"OD", b"OL", b"OV", b"SQ", b"UT", b"UN", b"UC", b"UR", b"SV", b"UV"}


@dataclass
class MetaGroup:
    """The (0002,xxxx) elements as found: ``(element, VR or b"", value)``, and where the data set starts."""

    transfer_syntax: str | None = None
    end: int = 0
    explicit: bool = True
    elements: list[tuple[int, bytes, bytes]] = field(default_factory=list)


def read_meta_group(path: str) -> MetaGroup:
    """Parse the file meta group from the first :data:`META_READ` bytes (preamble optional)."""
    with open(path, "rb") as f:
        head = f.read(META_READ)
    meta = MetaGroup()
    pos = 132 if head[128:132] == b"DICM" else 0
    meta.end = pos
    while pos + 8 <= len(head):
        group, elem = struct.unpack_from("<HH", head, pos)
        if group != 0x0002:
            break
        vr = head[pos + 4:pos + 6]
        if vr.isalpha() and vr.isupper():
            if vr in _LONG_VR:
                if pos + 12 > len(head):
                    break
                (length,), start = struct.unpack_from("<I", head, pos + 8), pos + 12
            else:
                (length,), start = struct.unpack_from("<H", head, pos + 6), pos + 8
        else:  # implicit VR meta (non-conformant, but pydicom reads it)
            (length,), start, vr, meta.explicit = struct.unpack_from("<I", head, pos + 4), pos + 8, b"", False
        if start + length > len(head):
            break
        value = head[start:start + length]
        meta.elements.append((elem, vr, value))
        if elem == 0x0010:
            meta.transfer_syntax = value[:64].rstrip(b"\0 ").decode("ascii", "replace")
        pos = start + length
        meta.end = pos
    return meta


def _element(elem: int, vr: bytes, value: bytes) -> bytes:
    if vr in _LONG_VR:
        return struct.pack("<HH2s2xI", 2, elem, vr, len(value)) + value
    return struct.pack("<HH2sH", 2, elem, vr, len(value)) + value


def explicit_prefix(meta: MetaGroup, path: str) -> bytes:
    """Preamble, ``DICM`` and ``meta`` re-encoded with the Explicit VR Little Endian transfer syntax."""
    if not meta.explicit or meta.transfer_syntax is None:
        raise UnsupportedFormatError("uses the Deflated transfer syntax with a non-conformant file meta "
                                     "group; refused without inflating it", path=path)
    ts = EXPLICIT_LE.encode() + b"\0"
    body = b"".join(_element(e, b"UI", ts) if e == 0x0010 else _element(e, vr, v)
                    for e, vr, v in meta.elements if e != 0x0000)
    return b"\0" * 128 + b"DICM" + struct.pack("<HH2sHI", 2, 0, b"UL", 4, len(body)) + body


class Inflater:
    """Inflates the data set of ``path`` (raw deflate after ``meta.end``) into ``out``, on demand."""

    def __init__(self, path: str, meta: MetaGroup, out: str) -> None:
        self.path = path
        self._src = open(path, "rb")
        self._src.seek(meta.end)
        self._out = open(out, "wb")
        self._out.write(explicit_prefix(meta, path))
        self.size = self._out.tell()
        self.eof = False
        self._d = zlib.decompressobj(-zlib.MAX_WBITS)

    def fill(self, upto: int) -> bool:
        """Inflate until the output file holds ``upto`` bytes or the stream ends; True at the end."""
        try:
            while self.size < upto and not self.eof:
                data = self._d.unconsumed_tail or self._src.read(64 * 1024)
                if not data:
                    self._write(self._d.flush(min(STEP, upto - self.size)))
                    self.eof = True
                    break
                self._write(self._d.decompress(data, min(STEP, upto - self.size)))
                self.eof = self._d.eof
        except zlib.error as exc:
            raise CorruptFileError(f"the deflated data set is corrupt ({exc})", path=self.path) from None
        self._out.flush()
        return self.eof

    def _write(self, data: bytes) -> None:
        self._out.write(data)
        self.size += len(data)

    def close(self) -> None:
        self._src.close()
        self._out.close()


def check_top_level(path: str, start: int, out_path: str, limit: int = 100_000) -> None:
    """Walk the inflated data set's top-level elements in ``out_path`` from ``start`` up to PixelData.

    Tags must ascend, be outside groups 0000-0002 and carry a valid explicit VR:
    a stream of zeros or junk is refused here in microseconds instead of being
    parsed as hundreds of thousands of empty elements. The walk stops (and leaves
    the rest to pydicom) at PixelData or at the first undefined-length element.
    """
    with open(out_path, "rb") as f:
        f.seek(start)
        buf = f.read(HEADER_BUDGET + 16)
    pos, prev = 0, -1
    for _ in range(limit):
        if pos + 8 > len(buf):
            return
        group, elem = struct.unpack_from("<HH", buf, pos)
        tag = group << 16 | elem
        if tag == 0x7FE00010:
            return
        vr = buf[pos + 4:pos + 6]
        if tag <= prev or group <= 0x0002 or not (vr.isalpha() and vr.isupper()):
            raise CorruptFileError(f"the inflated data set is not a sequence of DICOM elements (element "
                                   f"({group:04X},{elem:04X}) at byte {pos}); refused", path=path)
        if vr in _LONG_VR:
            if pos + 12 > len(buf):
                return
            (length,), pos = struct.unpack_from("<I", buf, pos + 8), pos + 12
        else:
            (length,), pos = struct.unpack_from("<H", buf, pos + 6), pos + 8
        if length == 0xFFFFFFFF:
            return
        pos, prev = pos + length, tag
    raise CorruptFileError(f"the inflated header has more than {limit} elements; refused", path=path)
