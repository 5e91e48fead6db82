"""Client addresses: one spelling of each (the log, --max-per-ip, PROXY headers), and
whether one is in the networks of --allow or --quiet-from."""

import ipaddress

from gcmd.config import Network

_MAPPED = ipaddress.ip_network("::ffff:0:0/96")


def canonical(address: str) -> str:
    """One spelling per client address: an IPv4-mapped IPv6 address (RFC 4291 section 2.5.5.2),
    as a dual-stack socket or a PROXY header gives it, is the IPv4 address; other IPv6
    addresses are compressed (RFC 5952); IPv4 (as the kernel writes it) and non-addresses stay."""
    if ":" not in address:
        return address
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    return str(ip.ipv4_mapped or ip)


def unmapped(network: Network) -> Network:
    """``::ffff:a.b.c.d/n`` (n >= 96) is the IPv4 network ``a.b.c.d/(n - 96)``, which a
    canonical address is matched against; other networks stay."""
    if network.version == 6 and network.prefixlen >= 96 and network.subnet_of(_MAPPED):
        return ipaddress.ip_network((network.network_address.ipv4_mapped, network.prefixlen - 96))
    return network


class Counts(dict[str, int]):
    """Counts by address (clients admitted, handshakes under way): an address counted down
    to 0 is forgotten, so that they stay as many as the addresses connected. A dict, not a
    Counter: a Counter's missing key and its ``del`` run Python code, which once made a third
    of the cost of admitting a client."""

    def add(self, ip: str) -> None:
        """Count ``ip`` up by one. Read a count with ``get(ip, 0)``: an address not counted is absent."""
        self[ip] = self.get(ip, 0) + 1

    def drop(self, ip: str) -> None:
        """Count ``ip`` down by one (an address not counted stays absent)."""
        if (count := self.get(ip, 0)) > 1:
            self[ip] = count - 1
        else:
            self.pop(ip, None)


def within(ip: str, networks: tuple[Network, ...]) -> bool:
    """Whether the canonical address ``ip`` (an IPv6 scope ignored) is in one of ``networks``
    (unmapped); False for what is not an address."""
    try:
        address = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return False
    return any(address in network for network in networks)
