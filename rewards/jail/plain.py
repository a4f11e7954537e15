"""Plain data on the wire between the checker and the candidate: the only values that cross (no pickle, no eval).

    encode(value) -> bytes        raises NonPlain for anything but None, bool, int, float, complex, str, bytes,
                                  list, tuple, dict, set (exact types: `type(x) is int`, never isinstance)
    decode(data) -> value         raises Malformed for anything encode would not produce
    send(fd, value) / recv(fd, deadline=None) -> value     4-byte big-endian length, then the encoding

Decoding builds fresh built-in objects from bytes, so whatever the sender is, the receiver only ever holds genuine
plain values (no subclass with a rigged __eq__ can arrive). Caps: MAX_BYTES per message, MAX_DEPTH nesting.
"""
import os
import select
import struct
import time

MAX_BYTES = 32 << 20
MAX_DEPTH = 64
_LEN = struct.Struct(">I")
_F64 = struct.Struct(">d")
_C128 = struct.Struct(">dd")


class NonPlain(ValueError):
    """A value that is not plain data (or is too large/deep to send)."""


class Malformed(ValueError):
    """Bytes that are not an encoding this module produces (a broken or hostile sender)."""


def encode(value):
    out = []
    _encode(value, out, 0)
    data = b"".join(out)
    if len(data) > MAX_BYTES:
        raise NonPlain(f"value over {MAX_BYTES} bytes")
    return data


def _encode(value, out, depth):
    if depth > MAX_DEPTH:
        raise NonPlain(f"nested deeper than {MAX_DEPTH}")
    kind = type(value)
    if value is None:
        out.append(b"N")
    elif kind is bool:
        out.append(b"T" if value else b"F")
    elif kind is int:
        raw = value.to_bytes((value.bit_length() + 8) // 8, "big", signed=True)
        out.append(b"i" + _LEN.pack(len(raw)) + raw)
    elif kind is float:
        out.append(b"f" + _F64.pack(value))
    elif kind is complex:
        out.append(b"c" + _C128.pack(value.real, value.imag))
    elif kind is str:
        raw = value.encode("utf-8", "surrogatepass")
        out.append(b"s" + _LEN.pack(len(raw)) + raw)
    elif kind is bytes:
        out.append(b"b" + _LEN.pack(len(value)) + value)
    elif kind is list or kind is tuple or kind is set:
        out.append({list: b"l", tuple: b"t", set: b"S"}[kind] + _LEN.pack(len(value)))
        for item in value:
            _encode(item, out, depth + 1)
    elif kind is dict:
        out.append(b"d" + _LEN.pack(len(value)))
        for key, item in value.items():
            _encode(key, out, depth + 1)
            _encode(item, out, depth + 1)
    else:
        raise NonPlain(f"{_type_name(value)} is not plain data")


def _type_name(value):
    try:
        return type(value).__name__
    except BaseException:  # a hostile metaclass; the name is only for the message
        return "unnamed type"


def decode(data):
    if len(data) > MAX_BYTES:
        raise Malformed("message too large")
    value, end = _decode(data, 0, 0)
    if end != len(data):
        raise Malformed("trailing bytes")
    return value


def _take(data, pos, n):
    if n < 0 or pos + n > len(data):
        raise Malformed("truncated")
    return data[pos:pos + n], pos + n


def _decode(data, pos, depth):
    if depth > MAX_DEPTH:
        raise Malformed("too deep")
    tag, pos = _take(data, pos, 1)
    if tag == b"N":
        return None, pos
    if tag in (b"T", b"F"):
        return tag == b"T", pos
    if tag == b"f":
        raw, pos = _take(data, pos, 8)
        return _F64.unpack(raw)[0], pos
    if tag == b"c":
        raw, pos = _take(data, pos, 16)
        return complex(*_C128.unpack(raw)), pos
    raw, pos = _take(data, pos, 4)
    count = _LEN.unpack(raw)[0]
    if tag in (b"i", b"s", b"b"):
        raw, pos = _take(data, pos, count)
        if tag == b"i":
            return int.from_bytes(raw, "big", signed=True), pos
        if tag == b"b":
            return bytes(raw), pos
        try:
            return raw.decode("utf-8", "surrogatepass"), pos
        except UnicodeDecodeError as exc:
            raise Malformed("bad utf-8") from exc
    if count > len(data) - pos:  # every item takes at least one byte
        raise Malformed("count beyond the message")
    if tag in (b"l", b"t", b"S"):
        items = []
        for _ in range(count):
            item, pos = _decode(data, pos, depth + 1)
            items.append(item)
        try:
            return (list(items) if tag == b"l" else tuple(items) if tag == b"t" else set(items)), pos
        except TypeError as exc:  # an unhashable member of a set
            raise Malformed(str(exc)) from exc
    if tag == b"d":
        out = {}
        for _ in range(count):
            key, pos = _decode(data, pos, depth + 1)
            item, pos = _decode(data, pos, depth + 1)
            try:
                out[key] = item
            except TypeError as exc:
                raise Malformed(str(exc)) from exc
        return out, pos
    raise Malformed(f"unknown tag {tag!r}")


# ------------------------------------------------------------------------------------------------ framing
def send(fd, value):
    """Write one message (raises NonPlain before writing anything when the value cannot be sent)."""
    data = encode(value)
    view = memoryview(_LEN.pack(len(data)) + data)
    while view:
        view = view[os.write(fd, view):]


def recv(fd, deadline=None):
    """One message; None at end of file; TimeoutError when `deadline` (time.monotonic()) passes first."""
    head = _read_exact(fd, 4, deadline)
    if head is None:
        return None
    size = _LEN.unpack(head)[0]
    if size > MAX_BYTES:
        raise Malformed("message too large")
    body = _read_exact(fd, size, deadline) if size else b""
    if body is None:
        raise Malformed("truncated message")
    return decode(body)


def _read_exact(fd, n, deadline):
    chunks, got = [], 0
    while got < n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError("no reply in time")
        chunk = os.read(fd, min(n - got, 1 << 20))
        if not chunk:
            if got == 0:
                return None
            raise Malformed("truncated message")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)
