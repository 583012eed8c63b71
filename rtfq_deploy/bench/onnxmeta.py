"""The ``metadata_props`` of an ONNX file, read without onnx or a runtime.

OpenVINO does not expose an ONNX file's metadata, and a device that runs only OpenVINO
has neither onnx nor onnxruntime; the benchmark still needs each file's ``rtfq.*``
entries (subnet, MACs, input). ``ModelProto`` is a protobuf message whose field 14 is
``repeated StringStringEntryProto metadata_props`` (``key`` = 1, ``value`` = 2); this
walks the top-level fields, skipping the graph without parsing it.
"""

from __future__ import annotations

import mmap
import os
from typing import Mapping

_METADATA_PROPS = 14
_MAX_ENTRY = 16 << 20  # one metadata entry beyond this is not an rtfq export


class MetadataError(ValueError):
    """The file is not a readable ONNX ModelProto."""


def _varint(buf: bytes | mmap.mmap, pos: int, end: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= end or shift > 63:
            raise MetadataError("truncated or malformed protobuf varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def _fields(buf: bytes | mmap.mmap, pos: int, end: int):  # type: ignore[no-untyped-def]
    """(field number, wire type, value or (start, stop) of a length-delimited field)."""
    while pos < end:
        key, pos = _varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos, end)
            yield number, wire, value
        elif wire == 1:
            pos += 8
            yield number, wire, None
        elif wire == 2:
            length, pos = _varint(buf, pos, end)
            if pos + length > end:
                raise MetadataError("truncated protobuf field")
            yield number, wire, (pos, pos + length)
            pos += length
        elif wire == 5:
            pos += 4
            yield number, wire, None
        else:
            raise MetadataError(f"protobuf wire type {wire} is not valid in an ONNX model")
    if pos != end:
        raise MetadataError("truncated protobuf message")


def _entry(buf: bytes | mmap.mmap, start: int, stop: int) -> tuple[str, str]:
    if stop - start > _MAX_ENTRY:
        raise MetadataError("a metadata entry is implausibly large")
    key = value = ""
    for number, wire, span in _fields(buf, start, stop):
        if wire == 2 and number in (1, 2):
            text = bytes(buf[span[0]:span[1]]).decode("utf-8", errors="replace")
            key, value = (text, value) if number == 1 else (key, text)
    return key, value


def read_metadata(path: str | os.PathLike) -> Mapping[str, str]:
    """Every ``metadata_props`` entry of the ONNX file at ``path`` (MetadataError if it
    is not a protobuf message; an RtfqError for a FIFO, a device or a folder, which are
    never waited on or mapped)."""
    from rtfq_deploy.fileio import open_regular

    with open_regular(path, "ONNX model") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise MetadataError("empty file")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            out: dict[str, str] = {}
            for number, wire, span in _fields(buf, 0, size):
                if number == _METADATA_PROPS and wire == 2:
                    key, value = _entry(buf, *span)
                    out[key] = value
            return out
