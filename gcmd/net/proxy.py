"""HAProxy's PROXY protocol, versions 1 and 2 (HAProxy's ``proxy-protocol.txt``):
the header a load balancer that relays TCP (``send-proxy``, ``send-proxy-v2``)
sends first, naming the client whose connection it opened."""

import ipaddress
import struct

from gcmd.net.addresses import canonical

#: the first 12 bytes of a version 2 header
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
#: the longest version 1 header, its CRLF included (bytes)
V1_MAX = 107
#: the longest header of either version (bytes): a version 2 header says its length in 2 bytes
LONGEST = 16 + 0xFFFF
_V1_FAMILIES = {b"TCP4": ipaddress.IPv4Address, b"TCP6": ipaddress.IPv6Address}
#: version 2 families (high nibble of byte 13), INET and INET6: the class and size of an address
_V2_FAMILIES = {0x1: (ipaddress.IPv4Address, 4), 0x2: (ipaddress.IPv6Address, 16)}


class ProxyError(ValueError):
    """The connection does not start with a valid PROXY header."""


def parse(data: bytes) -> tuple[int, str | None] | None:
    """The length (bytes) of the header at the start of ``data`` and the client address it
    names (None: version 1 UNKNOWN, version 2 LOCAL as a health check, or not TCP over IP;
    the connection's own stands); None when ``data`` holds only the start of a header."""
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
    try:
        if b"%" in fields[2] + fields[3]:
            raise ValueError("an IPv6 scope")  # any bytes may follow a %
        source, _ = (_V1_FAMILIES[fields[1]](field.decode("ascii")) for field in fields[2:4])
        if not all(field.isdigit() and int(field) <= 65535 and field == b"%d" % int(field) for field in fields[4:]):
            raise ValueError("a bad port")
    except (ValueError, UnicodeDecodeError):
        raise ProxyError("version 1 header with a bad address or port") from None
    return end + 2, canonical(str(source))


def _parse_v2(data: bytes) -> tuple[int, str | None] | None:
    if len(data) < 16:
        return None
    version_command, family_protocol, length = struct.unpack_from("!BBH", data, 12)
    version, command = version_command >> 4, version_command & 0xF
    if version != 2 or command > 1:
        raise ProxyError(f"version 2 signature with version {version}, command {command}")
    if len(data) < 16 + length:
        return None
    family = _V2_FAMILIES.get(family_protocol >> 4)
    if command == 0 or family_protocol & 0xF != 1 or family is None:
        return 16 + length, None  # LOCAL, not TCP, or not IP: keep the connection's address
    address, size = family
    if length < 2 * size + 4:
        raise ProxyError("version 2 header too short for its addresses")
    return 16 + length, canonical(str(address(data[16:16 + size])))
