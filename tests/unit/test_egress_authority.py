"""CONNECT and proxy-request authorities: what egress accepts as host and port, and what is a 400."""

from __future__ import annotations

import pytest

from laneproxy.core.errors import DownstreamProtocolError
from laneproxy.dataplane.egress import split_authority


@pytest.mark.parametrize(("authority", "default_port", "expected"), [
    (b"example.com:443", None, ("example.com", 443)),
    (b"example.com", 80, ("example.com", 80)),
    (b"10.0.0.1:6379", None, ("10.0.0.1", 6379)),
    (b"[::1]:8443", None, ("::1", 8443)),
    (b"[fd00::1]", 80, ("fd00::1", 80)),
    (b"db_1.internal.:5432", None, ("db_1.internal.", 5432)),
    (b"a:65535", None, ("a", 65535)),
])
def test_a_host_and_port_are_split_from_an_authority(authority, default_port, expected):
    assert split_authority(authority, default_port) == expected


@pytest.mark.parametrize(("authority", "default_port"), [
    (b"example.com", None),  # CONNECT needs a port
    (b"example.com:", None),
    (b"example.com:0", None),
    (b"example.com:65536", None),
    (b"example.com:0443x", None),
    (b"example.com:+443", None),
    (b"example.com:\xd9\xa3", None),  # an Arabic-Indic digit is a digit to str.isdigit
    (b":443", None),
    (b"a..b:443", None),
    (b"-a.example:443", None),
    (b"a" * 64 + b".example:443", None),
    (b"a." * 127 + b"ab:443", None),
    (b"user@example.com:443", None),
    (b"exa mple.com:443", None),
    (b"[::1:443", None),
    (b"[::1]x:443", None),
    (b"[zz::1]:443", None),
])
def test_anything_else_is_a_downstream_protocol_error(authority, default_port):
    with pytest.raises(DownstreamProtocolError):
        split_authority(authority, default_port)
