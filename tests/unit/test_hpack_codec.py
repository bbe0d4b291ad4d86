"""The HPACK codec against the `hpack` library both ways, RFC 7541 Appendix C byte for byte, and malformed blocks."""

from __future__ import annotations

import hpack
import pytest
from hpack import NeverIndexedHeaderTuple
from hpack.exceptions import (HPACKDecodingError, InvalidTableIndexError, InvalidTableSizeError,
                              OversizedHeaderListError)
from hypothesis import given, settings
from hypothesis import strategies as st

from laneproxy.dataplane.hpack_codec import MAX_INTEGER_BYTES, STATIC_TABLE, Decoder, Encoder, decode_huffman

names = st.one_of(st.sampled_from([name for name, _ in STATIC_TABLE]), st.binary(min_size=1, max_size=40))
values = st.one_of(st.sampled_from([value for _, value in STATIC_TABLE]), st.binary(max_size=300))
header_lists = st.lists(st.tuples(names, values), max_size=20)


def started_encoder() -> Encoder:
    """An encoder past its first block (which leads with the table size update)."""
    encoder = Encoder()
    encoder.encode([])
    return encoder


@settings(max_examples=300, deadline=None)
@given(st.lists(header_lists, min_size=1, max_size=5))
def test_blocks_encoded_here_decode_in_hpack_to_the_same_fields(blocks: list[list[tuple[bytes, bytes]]]) -> None:
    encoder, decoder = Encoder(), hpack.Decoder()
    for block in blocks:
        assert decoder.decode(encoder.encode(block), raw=True) == block


@settings(max_examples=300, deadline=None)
@given(st.lists(header_lists, min_size=1, max_size=5), st.booleans(), st.integers(min_value=0, max_value=4096))
def test_blocks_hpack_encodes_decode_here_to_the_same_fields(blocks: list[list[tuple[bytes, bytes]]], huffman: bool,
                                                             table_size: int) -> None:
    encoder, decoder = hpack.Encoder(), Decoder()
    encoder.header_table_size = table_size  # a size update, then evictions at that size
    for block in blocks:
        assert decoder.decode(encoder.encode(block, huffman=huffman), raw=True) == block
    assert decoder.header_table_size == table_size


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64))
def test_arbitrary_bytes_decode_like_hpack_or_fail_with_an_hpack_error(data: bytes) -> None:
    ours, theirs = Decoder(), hpack.Decoder()
    try:
        expected = theirs.decode(data, raw=True)
    except (HPACKDecodingError, IndexError):
        with pytest.raises(HPACKDecodingError):
            ours.decode(data, raw=True)
        return
    assert ours.decode(data, raw=True) == expected


def test_static_fields_are_one_index_byte_and_others_plain_literals_as_rfc_7541_c2() -> None:
    encoder = started_encoder()
    assert encoder.encode([(b":method", b"GET")]) == bytes.fromhex("82")  # C.2.4
    assert encoder.encode([(b":path", b"/sample/path")]) == bytes.fromhex("040c2f73616d706c652f70617468")  # C.2.2
    assert encoder.encode([NeverIndexedHeaderTuple(b"password", b"secret")]) == bytes.fromhex(
        "100870617373776f726406736563726574")  # C.2.3


def test_the_first_block_sets_the_peers_table_to_zero_and_later_ones_do_not() -> None:
    encoder = Encoder()
    assert encoder.encode([(b":method", b"GET")]) == b"\x20\x82"
    encoder.header_table_size = 0  # the peer shrinks its table: nothing is owed, ours was always empty
    assert encoder.encode([(b":method", b"GET")]) == b"\x82"


def test_credentials_are_never_indexed_even_when_the_caller_did_not_say_so() -> None:
    block = started_encoder().encode([(b"authorization", b"Bearer x"), (b"cookie", b"a=b")])
    decoded = hpack.Decoder().decode(block, raw=True)
    assert [type(header) for header in decoded] == [NeverIndexedHeaderTuple, NeverIndexedHeaderTuple]


def test_never_indexed_fields_decode_as_never_indexed_so_they_are_forwarded_that_way() -> None:
    block = hpack.Encoder().encode([NeverIndexedHeaderTuple(b"x-token", b"t")])
    assert isinstance(Decoder().decode(block, raw=True)[0], NeverIndexedHeaderTuple)
    assert isinstance(Decoder().decode(block)[0], NeverIndexedHeaderTuple)


C3_REQUESTS = [  # RFC 7541 C.3 (plain literals) and C.4 (Huffman): three requests on one connection
    ("828684410f7777772e6578616d706c652e636f6d", [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"),
                                                  (b":authority", b"www.example.com")], 57),
    ("828684be58086e6f2d6361636865", [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"),
                                      (b":authority", b"www.example.com"), (b"cache-control", b"no-cache")], 110),
    ("828785bf400a637573746f6d2d6b65790c637573746f6d2d76616c7565",
     [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/index.html"), (b":authority", b"www.example.com"),
      (b"custom-key", b"custom-value")], 164),
]
C4_REQUESTS = ["828684418cf1e3c2e5f23a6ba0ab90f4ff", "828684be5886a8eb10649cbf",
               "828785bf408825a849e95ba97d7f8925a849e95bb8e8b4bf"]
C5_RESPONSES = [  # C.5 (plain) and C.6 (Huffman) with a 256-byte table: entries are evicted
    ("4803333032580770726976617465611d4d6f6e2c203231204f637420323031332032303a31333a323120474d546e1768747470733a2f2f"
     "7777772e6578616d706c652e636f6d",
     [(b":status", b"302"), (b"cache-control", b"private"), (b"date", b"Mon, 21 Oct 2013 20:13:21 GMT"),
      (b"location", b"https://www.example.com")], 222),
    ("4803333037c1c0bf", [(b":status", b"307"), (b"cache-control", b"private"),
                          (b"date", b"Mon, 21 Oct 2013 20:13:21 GMT"), (b"location", b"https://www.example.com")], 222),
    ("88c1611d4d6f6e2c203231204f637420323031332032303a31333a323220474d54c05a04677a69707738666f6f3d4153444a4b48514b425a"
     "584f5157454f50495541585157454f49553b206d61782d6167653d333630303b2076657273696f6e3d31",
     [(b":status", b"200"), (b"cache-control", b"private"), (b"date", b"Mon, 21 Oct 2013 20:13:22 GMT"),
      (b"location", b"https://www.example.com"), (b"content-encoding", b"gzip"),
      (b"set-cookie", b"foo=ASDJKHQKBZXOQWEOPIUAXQWEOIU; max-age=3600; version=1")], 215),
]
C6_RESPONSES = ["488264025885aec3771a4b6196d07abe941054d444a8200595040b8166e082a62d1bff6e919d29ad171863c78f0b97c8e9ae82ae43d3",
                "4883640effc1c0bf",
                "88c16196d07abe941054d444a8200595040b8166e084a62d1bffc05a839bd9ab77ad94e7821dd7f2e6c7b335dfdfcd5b3960d5af27087f"
                "3672c1ab270fb5291f9587316065c003ed4ee5b1063d5007"]


@pytest.mark.parametrize("huffman", [False, True])
def test_rfc_7541_appendix_c_requests_decode_with_the_listed_table_sizes(huffman: bool) -> None:
    decoder = Decoder()
    for (plain, fields, table_size), coded in zip(C3_REQUESTS, C4_REQUESTS):
        assert decoder.decode(bytes.fromhex(coded if huffman else plain), raw=True) == fields
        assert decoder._size == table_size


@pytest.mark.parametrize("huffman", [False, True])
def test_rfc_7541_appendix_c_responses_evict_from_a_256_byte_table(huffman: bool) -> None:
    decoder = Decoder()
    decoder.header_table_size = 256
    for (plain, fields, table_size), coded in zip(C5_RESPONSES, C6_RESPONSES):
        assert decoder.decode(bytes.fromhex(coded if huffman else plain), raw=True) == fields
        assert decoder._size == table_size
    assert len(decoder._entries) == 3


def test_an_index_past_both_tables_is_an_invalid_index() -> None:
    with pytest.raises(InvalidTableIndexError):
        Decoder().decode(b"\xbe", raw=True)  # 62: the dynamic table is empty
    with pytest.raises(InvalidTableIndexError):
        Decoder().decode(b"\x80", raw=True)  # 0 is never an index


def test_an_integer_longer_than_the_bound_is_refused_before_it_is_used() -> None:
    huge = b"\xff" + b"\xff" * (MAX_INTEGER_BYTES + 100) + b"\x01"  # an index of about 2**700
    with pytest.raises(HPACKDecodingError, match="longer than"):
        Decoder().decode(huge, raw=True)


def test_a_string_longer_than_its_block_is_refused_without_reading_past_it() -> None:
    block = b"\x00\x7f\xff\xff\xff\x0f" + b"n"  # a literal name claiming ~2**28 bytes
    with pytest.raises(HPACKDecodingError, match="longer than the block"):
        Decoder().decode(block, raw=True)
    with pytest.raises(HPACKDecodingError, match="longer than the block"):
        Decoder().decode(b"\x00\x03ab", raw=True)
    with pytest.raises(HPACKDecodingError, match="cut off"):
        Decoder().decode(b"\x00", raw=True)  # a literal with no name at all


def test_a_table_size_update_beyond_the_allowed_size_is_refused() -> None:
    decoder = Decoder()
    decoder.max_allowed_table_size = 100
    with pytest.raises(InvalidTableSizeError):
        decoder.decode(b"\x3f\xe1\xff\xff\x07", raw=True)  # about 2**24
    with pytest.raises(InvalidTableSizeError):
        Decoder().decode(b"\x3f\xe2\x1f", raw=True)  # 4097, one past the default


def test_a_shrunk_allowance_the_peer_did_not_follow_is_refused_at_the_end_of_the_block() -> None:
    decoder = Decoder()
    decoder.max_allowed_table_size = 0  # our SETTINGS_HEADER_TABLE_SIZE 0 was acknowledged
    with pytest.raises(InvalidTableSizeError):
        decoder.decode(b"\x82", raw=True)
    assert Decoder().decode(b"\x20\x82", raw=True) == [(b":method", b"GET")]


def test_a_table_size_update_after_a_field_is_refused() -> None:
    with pytest.raises(HPACKDecodingError, match="start of the block"):
        Decoder().decode(b"\x82\x20", raw=True)


def test_a_header_list_past_the_limit_is_an_oversized_list_as_hpack_says() -> None:
    decoder = Decoder(max_header_list_size=100)
    small = hpack.Encoder().encode([(b"x", b"y" * 60)])
    assert decoder.decode(small, raw=True) == [(b"x", b"y" * 60)]
    indexed_twice = hpack.Encoder().encode([(b"x", b"y" * 60), (b"x", b"y" * 60)])  # the second is one index byte
    with pytest.raises(OversizedHeaderListError):
        Decoder(max_header_list_size=100).decode(indexed_twice, raw=True)


def test_huffman_padding_that_is_not_ones_or_holds_eos_is_refused() -> None:
    assert decode_huffman(bytes.fromhex("f1e3c2e5f23a6ba0ab90f4ff")) == b"www.example.com"
    with pytest.raises(HPACKDecodingError):
        decode_huffman(b"\xff\xff\xff\xff")  # 30 ones: the EOS symbol
    with pytest.raises(HPACKDecodingError):
        decode_huffman(b"\x00")  # '0' (00000) then 000 padding, which must be ones


def test_values_that_are_not_utf_8_are_an_hpack_error_unless_raw_bytes_were_asked() -> None:
    block = hpack.Encoder().encode([(b"x", b"\xff")])
    assert Decoder().decode(block, raw=True) == [(b"x", b"\xff")]
    with pytest.raises(HPACKDecodingError):
        Decoder().decode(block)
