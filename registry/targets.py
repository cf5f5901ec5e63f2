"""`server.allowed_targets`: the hosts and networks the daemon may be told to contact.

Without it a token that may register could point probes (and workflow calls) at
any address the daemon can reach: its cloud metadata endpoint, the admin port
of a database. With it, an instance URL's host must be an IP address inside one
of the listed networks, or a name matching one of the listed host globs. Names
are matched as names, never resolved here: `localhost` is allowed by listing
`localhost`, not by listing 127.0.0.0/8.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from fnmatch import fnmatchcase
from urllib.parse import urlsplit

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_target(entry: str) -> Network | str:
    """A network (`10.0.0.0/8`, `127.0.0.1`, `::1`) or a lowercase host glob (`*.internal`)."""
    text = entry.strip()
    if not text:
        raise ValueError("an empty entry")
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        pass
    if "/" in text or ":" in text or " " in text:
        raise ValueError(f"{entry!r} is neither a network (10.0.0.0/8) nor a host name or glob")
    return text.lower()


@dataclass(frozen=True, kw_only=True, slots=True)
class TargetPolicy:
    networks: tuple[Network, ...] = ()
    hosts: tuple[str, ...] = ()
    enabled: bool = False

    @classmethod
    def from_entries(cls, entries: Iterable[str] | None) -> TargetPolicy:
        if entries is None:
            return cls()
        parsed = [parse_target(entry) for entry in entries]
        return cls(
            networks=tuple(p for p in parsed if not isinstance(p, str)),
            hosts=tuple(p for p in parsed if isinstance(p, str)),
            enabled=True,
        )

    def allows_host(self, host: str) -> bool:
        if not self.enabled:
            return True
        host = host.strip("[]").lower().rstrip(".")
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return any(fnmatchcase(host, pattern) for pattern in self.hosts)
        return any(address in network for network in self.networks)

    def allows_url(self, url: str) -> bool:
        if not self.enabled:
            return True
        host = urlsplit(url).hostname
        return host is not None and self.allows_host(host)

    def refusal(self, url: str) -> str | None:
        """Why `url` may not be contacted, or None when it may."""
        if self.allows_url(url):
            return None
        host = urlsplit(url).hostname or url
        return f"{host} is not in server.allowed_targets"
