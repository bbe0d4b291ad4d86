"""HPACK (RFC 7541) for the HTTP/2 codecs: a header block encoder and decoder that mypyc compiles.

Owns the two halves `h2` calls on every HEADERS frame, in place of the `hpack` library's pure-Python
ones (`H2Connection.encoder` / `.decoder`, same attributes and errors): the static table, the decoder's
dynamic table with its size updates and limits, integer and string primitives, and Huffman decoding
driven by the `hpack` library's state table (data, not code).

The encoder never adds to the dynamic table and never Huffman-codes: every field is the static table's
index when name and value are both there, else a literal whose name may be a static index, "without
indexing", or "never indexed" for credentials and for a field handed over as `NeverIndexedHeaderTuple`.
Its first block says "dynamic table size 0", so a peer that later shrinks SETTINGS_HEADER_TABLE_SIZE
is owed no update. Costs a few bytes per block on the wire, saves most of the CPU HPACK took.

The decoder refuses what `hpack` refuses, with the same exceptions (h2 turns OversizedHeaderListError
into a DenialOfServiceError, every other HPACKDecodingError into a COMPRESSION_ERROR GOAWAY), and bounds
what `hpack` does not: an integer longer than `MAX_INTEGER_BYTES` bytes and a table size beyond the
allowed one are errors before any memory is taken; a string is never longer than the block it is in.

Must never: allocate for a length it has not checked against the bytes it was given, keep a header
list past `max_header_list_size`, or know anything of streams, frames or HTTP semantics.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Iterable

from hpack import NeverIndexedHeaderTuple
from hpack.exceptions import (HPACKDecodingError, InvalidTableIndexError, InvalidTableSizeError,
                              OversizedHeaderListError)
from hpack.huffman_table import HUFFMAN_TABLE

DEFAULT_TABLE_SIZE = 4096
DEFAULT_MAX_HEADER_LIST_SIZE = 2**16
ENTRY_OVERHEAD = 32  # RFC 7541 4.1: a table entry's size is its name's and value's lengths plus 32
MAX_INTEGER_BYTES = 5  # continuation bytes after the prefix: up to 2**35, past any length or index we accept
_HUFFMAN_COMPLETE, _HUFFMAN_EMIT, _HUFFMAN_FAIL = 1, 2, 4

STATIC_TABLE: tuple[tuple[bytes, bytes], ...] = (
    (b":authority", b""), (b":method", b"GET"), (b":method", b"POST"), (b":path", b"/"),
    (b":path", b"/index.html"), (b":scheme", b"http"), (b":scheme", b"https"), (b":status", b"200"),
    (b":status", b"204"), (b":status", b"206"), (b":status", b"304"), (b":status", b"400"),
    (b":status", b"404"), (b":status", b"500"), (b"accept-charset", b""), (b"accept-encoding", b"gzip, deflate"),
    (b"accept-language", b""), (b"accept-ranges", b""), (b"accept", b""), (b"access-control-allow-origin", b""),
    (b"age", b""), (b"allow", b""), (b"authorization", b""), (b"cache-control", b""),
    (b"content-disposition", b""), (b"content-encoding", b""), (b"content-language", b""), (b"content-length", b""),
    (b"content-location", b""), (b"content-range", b""), (b"content-type", b""), (b"cookie", b""),
    (b"date", b""), (b"etag", b""), (b"expect", b""), (b"expires", b""),
    (b"from", b""), (b"host", b""), (b"if-match", b""), (b"if-modified-since", b""),
    (b"if-none-match", b""), (b"if-range", b""), (b"if-unmodified-since", b""), (b"last-modified", b""),
    (b"link", b""), (b"location", b""), (b"max-forwards", b""), (b"proxy-authenticate", b""),
    (b"proxy-authorization", b""), (b"range", b""), (b"referer", b""), (b"refresh", b""),
    (b"retry-after", b""), (b"server", b""), (b"set-cookie", b""), (b"strict-transport-security", b""),
    (b"transfer-encoding", b""), (b"user-agent", b""), (b"vary", b""), (b"via", b""),
    (b"www-authenticate", b""),
)
_STATIC_LENGTH = len(STATIC_TABLE)
_STATIC_FIELD: dict[tuple[bytes, bytes], int] = {}
_STATIC_NAME: dict[bytes, int] = {}
for _index, (_name, _value) in enumerate(STATIC_TABLE, 1):
    _STATIC_FIELD.setdefault((_name, _value), _index)
    _STATIC_NAME.setdefault(_name, _index)
# Never indexed whatever the caller says (RFC 7541 7.1.3: credentials an intermediary must not expose to
# a compression oracle, and must forward as never indexed).
SENSITIVE = frozenset({b"authorization", b"proxy-authorization", b"cookie", b"set-cookie"})
# The state table flattened: state * 16 + nibble -> (next state << 16) | (flags << 8) | symbol.
_HUFFMAN: list[int] = [(state << 16) | (flags << 8) | symbol for state, flags, symbol in HUFFMAN_TABLE]


def encode_integer(value: int, prefix_bits: int, first: int, out: bytearray) -> None:
    """RFC 7541 5.1: `value` with a `prefix_bits` prefix, OR-ed into the first byte's flags `first`."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        out.append(first | value)
        return
    out.append(first | limit)
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)


def decode_integer(data: bytes, position: int, prefix_bits: int) -> tuple[int, int]:
    """RFC 7541 5.1 from `data[position]`: (value, position after it). Bounded to MAX_INTEGER_BYTES."""
    end = len(data)
    if position >= end:
        raise HPACKDecodingError("Truncated header block: an integer is cut off")
    limit = (1 << prefix_bits) - 1
    value = data[position] & limit
    position += 1
    if value < limit:
        return value, position
    shift = 0
    for _ in range(MAX_INTEGER_BYTES):
        if position >= end:
            raise HPACKDecodingError("Truncated header block: an integer is cut off")
        byte = data[position]
        position += 1
        value += (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, position
        shift += 7
    raise HPACKDecodingError(f"An integer longer than {MAX_INTEGER_BYTES} bytes after its prefix")


def decode_huffman(data: bytes) -> bytes:
    """RFC 7541 5.2 / Appendix B: a nibble at a time through the state table; bad padding or EOS is an error."""
    table = _HUFFMAN
    out = bytearray()
    state = 0
    flags = _HUFFMAN_COMPLETE
    for byte in data:
        entry = table[(state << 4) | (byte >> 4)]
        flags = (entry >> 8) & 0xFF
        if flags & _HUFFMAN_FAIL:
            raise HPACKDecodingError("Invalid Huffman string")
        if flags & _HUFFMAN_EMIT:
            out.append(entry & 0xFF)
        state = entry >> 16
        entry = table[(state << 4) | (byte & 0x0F)]
        flags = (entry >> 8) & 0xFF
        if flags & _HUFFMAN_FAIL:
            raise HPACKDecodingError("Invalid Huffman string")
        if flags & _HUFFMAN_EMIT:
            out.append(entry & 0xFF)
        state = entry >> 16
    if not flags & _HUFFMAN_COMPLETE:
        raise HPACKDecodingError("Incomplete Huffman string")
    return bytes(out)


class Encoder:
    """A header block encoder for `H2Connection.encoder`: static indexes and plain literals, no dynamic table."""

    __slots__ = ("_table_size", "_announced")

    def __init__(self) -> None:
        self._table_size = DEFAULT_TABLE_SIZE
        self._announced = False

    @property
    def header_table_size(self) -> int:
        """The peer's SETTINGS_HEADER_TABLE_SIZE (h2 sets it); this encoder's own table stays at 0."""
        return self._table_size

    @header_table_size.setter
    def header_table_size(self, value: int) -> None:
        self._table_size = value

    def encode(self, headers: Iterable[object], huffman: bool = True) -> bytes:
        """One header block; `huffman` is accepted for h2's sake and ignored (literals are never Huffman-coded)."""
        out = bytearray()
        if not self._announced:
            self._announced = True
            out.append(0x20)  # dynamic table size update: 0
        for header in headers:
            never = isinstance(header, NeverIndexedHeaderTuple)
            field: tuple[bytes, bytes] = header  # type: ignore[assignment]
            name, value = field
            if never or name in SENSITIVE:
                index = _STATIC_NAME.get(name, 0)
                encode_integer(index, 4, 0x10, out)
            else:
                index = _STATIC_FIELD.get((name, value), 0)
                if index:
                    encode_integer(index, 7, 0x80, out)
                    continue
                index = _STATIC_NAME.get(name, 0)
                encode_integer(index, 4, 0x00, out)
            if not index:
                encode_integer(len(name), 7, 0, out)
                out += name
            encode_integer(len(value), 7, 0, out)
            out += value
        return bytes(out)


class Decoder:
    """A header block decoder for `H2Connection.decoder`, with `hpack.Decoder`'s attributes and errors."""

    __slots__ = ("_entries", "_size", "_max_size", "max_allowed_table_size", "max_header_list_size")

    def __init__(self, max_header_list_size: int = DEFAULT_MAX_HEADER_LIST_SIZE) -> None:
        self._entries: deque[tuple[bytes, bytes]] = deque()  # newest first: index 62 is _entries[0]
        self._size = 0
        self._max_size = DEFAULT_TABLE_SIZE
        self.max_allowed_table_size = DEFAULT_TABLE_SIZE  # our SETTINGS_HEADER_TABLE_SIZE, once acknowledged
        self.max_header_list_size = max_header_list_size

    @property
    def header_table_size(self) -> int:
        """The dynamic table's maximum size, as the peer's encoder last set it."""
        return self._max_size

    @header_table_size.setter
    def header_table_size(self, value: int) -> None:
        self._max_size = value
        self._evict(0)

    def _evict(self, room: int) -> None:
        entries = self._entries
        while entries and self._size + room > self._max_size:
            name, value = entries.pop()
            self._size -= len(name) + len(value) + ENTRY_OVERHEAD

    def _add(self, name: bytes, value: bytes) -> None:
        size = len(name) + len(value) + ENTRY_OVERHEAD
        if size > self._max_size:
            self._entries.clear()  # RFC 7541 4.4: an entry larger than the table empties it and is not added
            self._size = 0
            return
        self._evict(size)
        self._entries.appendleft((name, value))
        self._size += size

    def _field(self, index: int) -> tuple[bytes, bytes]:
        if 0 < index <= _STATIC_LENGTH:
            return STATIC_TABLE[index - 1]
        position = index - _STATIC_LENGTH - 1
        if index <= 0 or position >= len(self._entries):
            raise InvalidTableIndexError(f"Invalid table index {index}")
        return self._entries[position]

    def _string(self, data: bytes, position: int) -> tuple[bytes, int]:
        if position >= len(data):
            raise HPACKDecodingError("Truncated header block: a string is cut off")
        huffman = data[position] & 0x80
        length, position = decode_integer(data, position, 7)
        end = position + length
        if end > len(data):
            raise HPACKDecodingError("Truncated header block: a string is longer than the block")
        raw = data[position:end]
        return (decode_huffman(raw) if huffman else raw), end

    def decode(self, data: bytes, raw: bool = False) -> list[Any]:
        """A header block to (name, value) pairs: bytes if `raw`, else str (UTF-8, as `hpack` does).

        Plain tuples, and `NeverIndexedHeaderTuple` for a field the peer marked so (a list of Any: the compiled
        build would rebuild a typed tuple as a plain one and lose that mark)."""
        data = bytes(data)
        headers: list[Any] = []
        header: Any
        inflated = 0
        position = 0
        end = len(data)
        limit = self.max_header_list_size
        while position < end:
            first = data[position]
            if first & 0x80:  # indexed field
                index, position = decode_integer(data, position, 7)
                name, value = self._field(index)
                header = (name, value)
            elif first & 0x40:  # literal with incremental indexing
                index, position = decode_integer(data, position, 6)
                if index:
                    name = self._field(index)[0]
                else:
                    name, position = self._string(data, position)
                value, position = self._string(data, position)
                self._add(name, value)
                header = (name, value)
            elif first & 0x20:  # dynamic table size update: only before the first field
                if headers:
                    raise HPACKDecodingError("Table size update not at the start of the block")
                size, position = decode_integer(data, position, 5)
                if size > self.max_allowed_table_size:
                    raise InvalidTableSizeError("Encoder exceeded max allowable table size")
                self.header_table_size = size
                continue
            else:  # literal without indexing (0x00) or never indexed (0x10)
                index, position = decode_integer(data, position, 4)
                if index:
                    name = self._field(index)[0]
                else:
                    name, position = self._string(data, position)
                value, position = self._string(data, position)
                if first & 0x10:  # an if, not a conditional expression: mypyc would make both a plain tuple
                    header = NeverIndexedHeaderTuple(name, value)
                else:
                    header = (name, value)
            inflated += len(name) + len(value) + ENTRY_OVERHEAD
            if inflated > limit:
                raise OversizedHeaderListError(f"A header list larger than {limit} has been received")
            headers.append(header)
        if self._max_size > self.max_allowed_table_size:
            raise InvalidTableSizeError("Encoder did not shrink table size to within the max")
        if raw:
            return headers
        try:
            text: list[Any] = []
            for header in headers:
                if isinstance(header, NeverIndexedHeaderTuple):
                    text.append(NeverIndexedHeaderTuple(header[0].decode("utf-8"), header[1].decode("utf-8")))
                else:
                    text.append((header[0].decode("utf-8"), header[1].decode("utf-8")))
            return text
        except UnicodeDecodeError as err:
            raise HPACKDecodingError("Unable to decode headers as UTF-8") from err
