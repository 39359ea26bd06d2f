"""IP addresses from text, parsed once per distinct address.

The proxies ask about the same few peers again and again; `ipaddress` parsing costs a few
microseconds a call, which adds up on every request and every DNS answer.
"""
from __future__ import annotations

import functools
import ipaddress

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@functools.lru_cache(maxsize=65536)
def ip_object(text: str) -> IPAddress:
    """`ipaddress.ip_address(text)`, memoised (ValueError if not an address)."""
    return ipaddress.ip_address(text)


def is_loopback(text: str) -> bool:
    """A loopback address (127.0.0.0/8, ::1): this network namespace itself."""
    return text.startswith("127.") or text == "::1"


@functools.lru_cache(maxsize=65536)
def canonical_ip(text: str) -> str:
    """The address in its canonical text form (IPv6 compressed, lower case)."""
    return str(ip_object(text))
