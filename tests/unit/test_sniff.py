"""First-bytes protocol detection and the SNI of real ClientHellos (made by Python's ssl, as a client sends them)."""

from __future__ import annotations

import ssl

import pytest

from laneproxy.dataplane.sniff import H2_PREFACE, HTTP, HTTP2, TCP, TLS, classify, client_hello_sni


def client_hello(server_name: str | None, *, maximum: ssl.TLSVersion = ssl.TLSVersion.TLSv1_3) -> bytes:
    context = ssl.create_default_context()
    context.check_hostname = server_name is not None
    context.maximum_version = maximum
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


@pytest.mark.parametrize(("first_bytes", "kind"), [
    (b"GET / HTTP/1.1\r\n", HTTP),
    (b"POST /x HTTP/1.0\r\n", HTTP),
    (b"OPTIONS * HTTP/1.1\r\n", HTTP),
    (b"GE", None),  # could still be GET
    (b"DELET", None),
    (b"GETX / HTTP/1.1", TCP),
    (b"get / HTTP/1.1", TCP),  # methods are case-sensitive
    (H2_PREFACE, HTTP2),
    (H2_PREFACE[:10], None),
    (b"PRI * HTTP/1.1\r\n", TCP),
    (b"\x16\x03\x01\x02\x00\x01", TLS),
    (b"\x16", None),
    (b"\x16\x01", TCP),
    (b"*1\r\n$4\r\nPING\r\n", TCP),  # redis
    (b"\x00\x00\x00\x08\x04\xd2\x16\x2f", TCP),  # postgres SSLRequest
    (b"SSH-2.0-OpenSSH_9.2\r\n", TCP),
    (b"", None),
])
def test_the_first_bytes_tell_http_h2_tls_and_everything_else_apart(first_bytes, kind):
    assert classify(first_bytes) == kind


@pytest.mark.parametrize("maximum", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_the_sni_of_a_real_client_hello_is_read_and_its_absence_is_none(maximum):
    hello = client_hello("db.example.internal", maximum=maximum)
    assert classify(hello) == TLS
    assert client_hello_sni(hello) == "db.example.internal"
    assert client_hello_sni(client_hello(None, maximum=maximum)) is None


def test_a_client_hello_cut_short_or_mangled_never_raises_and_names_nothing_it_does_not_hold():
    hello = client_hello("db.example.internal")
    for end in range(0, len(hello), 7):
        name = client_hello_sni(hello[:end])
        assert name in (None, "db.example.internal")
    mangled = bytearray(hello)
    for at in range(5, len(mangled), 11):
        mangled[at] ^= 0xFF
        client_hello_sni(bytes(mangled))  # any answer but an exception
    assert client_hello_sni(b"\x16\x03\x01\xff\xff\x01" + b"\xff" * 40) is None
