"""HAProxy's PROXY protocol, versions 1 and 2: the client's real address.

A load balancer that relays TCP opens its own connection to gcmd; with
``send-proxy`` or ``send-proxy-v2`` it first sends one header that says whom
the connection is for. The specification is HAProxy's ``proxy-protocol.txt``.
"""

from __future__ import annotations

import ipaddress
import struct

#: the first 12 bytes of a version 2 header
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
#: the longest version 1 header, its CRLF included
V1_MAX = 107
#: the longest version 2 header: 16 fixed bytes and a 16-bit length
V2_MAX = 16 + 0xFFFF

_V1_FAMILIES = {b"TCP4": ipaddress.IPv4Address, b"TCP6": ipaddress.IPv6Address}
#: version 2 address families (high nibble of byte 13) and the length of their addresses
_V2_INET, _V2_INET6 = 0x1, 0x2
_V2_ADDRESS_SIZE = {_V2_INET: 12, _V2_INET6: 36}


def canonical(address: str) -> str:
    """One spelling per client address: an IPv4-mapped IPv6 address
    (``::ffff:a.b.c.d``, RFC 4291 section 2.5.5.2), as a dual-stack socket or a
    PROXY header may give it, is the IPv4 address ``a.b.c.d``; any other IPv6
    address is written in its compressed form (RFC 5952). Anything that is not
    an IP address is returned as it is."""
    if ":" not in address:  # IPv4, as the kernel writes it: already canonical
        return address
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    return str(ip.ipv4_mapped or ip)


class ProxyError(ValueError):
    """The connection does not start with a valid PROXY header."""


def parse(data: bytes) -> tuple[int, str | None] | None:
    """The length of the header at the start of ``data`` and the client address it names.

    The address is None when the header names none (version 1 ``UNKNOWN``,
    version 2 ``LOCAL`` such as a load balancer's health check, or a family
    other than TCP over IPv4 or IPv6): the connection's own address stands.
    None when ``data`` holds the start of a header but not all of it.
    """
    if data.startswith(b"PROXY "):
        return _parse_v1(data)
    if data.startswith(V2_SIGNATURE):
        return _parse_v2(data)
    if V2_SIGNATURE.startswith(data[:12]) or b"PROXY ".startswith(data[:6]):
        return None
    raise ProxyError("no PROXY header")


def _parse_v1(data: bytes) -> tuple[int, str | None] | None:
    end = data.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if len(data) >= V1_MAX:
            raise ProxyError("version 1 header without CRLF in 107 bytes")
        return None
    fields = data[:end].split(b" ")
    if fields[1] == b"UNKNOWN":
        return end + 2, None
    if len(fields) != 6 or fields[1] not in _V1_FAMILIES:
        raise ProxyError("version 1 header is not 'PROXY TCP4|TCP6 SRC DST SPORT DPORT'")
    family = _V1_FAMILIES[fields[1]]
    if b"%" in fields[2] or b"%" in fields[3]:
        raise ProxyError("version 1 header with an IPv6 scope")  # any bytes may follow a %
    try:
        source = family(fields[2].decode("ascii"))
        family(fields[3].decode("ascii"))
        ports = [int(port) for port in fields[4:]]
    except (ValueError, UnicodeDecodeError):
        raise ProxyError("version 1 header with a bad address or port") from None
    if not all(0 <= port <= 65535 and str(port).encode() == text
               for port, text in zip(ports, fields[4:])):
        raise ProxyError("version 1 header with a bad port")
    return end + 2, canonical(str(source))


def _parse_v2(data: bytes) -> tuple[int, str | None] | None:
    if len(data) < 16:
        return None
    version_command, family_protocol, length = struct.unpack_from("!BBH", data, 12)
    if version_command >> 4 != 2:
        raise ProxyError(f"version 2 signature with version {version_command >> 4}")
    command = version_command & 0xF
    if command > 1:
        raise ProxyError(f"version 2 header with unknown command {command}")
    if len(data) < 16 + length:
        return None
    family, protocol = family_protocol >> 4, family_protocol & 0xF
    if command == 0 or protocol != 1 or family not in _V2_ADDRESS_SIZE:
        return 16 + length, None  # LOCAL, not TCP, or not IP: keep the connection's address
    if length < _V2_ADDRESS_SIZE[family]:
        raise ProxyError("version 2 header too short for its addresses")
    if family == _V2_INET:
        source = ipaddress.IPv4Address(data[16:20])
    else:
        source = ipaddress.IPv6Address(data[16:32])
    return 16 + length, canonical(str(source))
