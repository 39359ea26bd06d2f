"""Where a redirected connection or datagram was really going (the proxies call these).

* TCP redirected by nat REDIRECT (the HTTP proxy): `original_dst(sock)` asks conntrack through
  getsockopt(SOL_IP, SO_ORIGINAL_DST) (IPv6: SOL_IPV6, IP6T_SO_ORIGINAL_DST, same number).
* TCP handed over by TPROXY (the DNS proxy over TCP): the accepted socket's own address is the
  original destination - `sock.getsockname()`; nothing to ask.
* UDP handed over by TPROXY: enable `IP_RECVORIGDSTADDR` on the transparent socket
  (`transparent_udp_socket` does) and read it from each datagram's ancillary data with
  `orig_dst_from_ancdata`.
Pure parsing plus one getsockopt; no policy.
"""
from __future__ import annotations

import ipaddress
import socket
import struct

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h
IP6T_SO_ORIGINAL_DST = 80  # linux/netfilter_ipv6/ip6_tables.h
IP_TRANSPARENT = getattr(socket, "IP_TRANSPARENT", 19)
IP_RECVORIGDSTADDR = getattr(socket, "IP_RECVORIGDSTADDR", 20)
IPV6_TRANSPARENT = 75
IPV6_RECVORIGDSTADDR = 74
SOL_IPV6 = getattr(socket, "SOL_IPV6", 41)


def parse_sockaddr_in(raw: bytes) -> tuple[str, int]:
    """struct sockaddr_in (family, port, 4-byte address) -> (ip, port)."""
    if len(raw) < 8:
        raise ValueError("short sockaddr_in")
    family = struct.unpack_from("=H", raw)[0]  # host byte order, like the kernel wrote it
    port = struct.unpack_from("!H", raw, 2)[0]
    addr = raw[4:8]
    if family != socket.AF_INET:
        raise ValueError(f"not a sockaddr_in (family {family})")
    return socket.inet_ntop(socket.AF_INET, addr), port


def parse_sockaddr_in6(raw: bytes) -> tuple[str, int]:
    """struct sockaddr_in6 (family, port, flowinfo, 16-byte address, scope) -> (ip, port)."""
    if len(raw) < 24:
        raise ValueError("short sockaddr_in6")
    family = struct.unpack_from("=H", raw)[0]
    if family != socket.AF_INET6:
        raise ValueError(f"not a sockaddr_in6 (family {family})")
    port = struct.unpack_from("!H", raw, 2)[0]
    return socket.inet_ntop(socket.AF_INET6, raw[8:24]), port


def _unmap(ip: str) -> str:
    addr = ipaddress.ip_address(ip)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
        return str(addr.ipv4_mapped)
    return ip


def original_dst(sock) -> tuple[str, int]:
    """(ip, port) the peer connected to before nat REDIRECT, from conntrack. A tracked connection
    that was not NATed gives the socket's own address; OSError (ENOENT) when conntrack has no
    entry. Works on any object with family and getsockopt (a socket, or asyncio's
    TransportSocket from `transport.get_extra_info('socket')`)."""
    if sock.family == socket.AF_INET6:
        try:
            ip, port = parse_sockaddr_in6(sock.getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST, 28))
            return _unmap(ip), port
        except OSError:
            pass  # an IPv4 connection on a dual-stack socket: ask the IPv4 conntrack
    return parse_sockaddr_in(sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16))


def orig_dst_from_ancdata(ancdata) -> tuple[str, int] | None:
    """The original destination of a TPROXYed datagram, from `recvmsg` ancillary data."""
    for level, kind, data in ancdata:
        if level == socket.SOL_IP and kind == IP_RECVORIGDSTADDR:
            return parse_sockaddr_in(data)
        if level == SOL_IPV6 and kind == IPV6_RECVORIGDSTADDR:
            ip, port = parse_sockaddr_in6(data)
            return _unmap(ip), port
    return None


def transparent_udp_socket(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    """A UDP socket TPROXY can deliver to: IP_TRANSPARENT, original destinations in ancdata."""
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_DGRAM)
    try:
        if fam == socket.AF_INET6:
            s.setsockopt(SOL_IPV6, IPV6_TRANSPARENT, 1)
            s.setsockopt(SOL_IPV6, IPV6_RECVORIGDSTADDR, 1)
        else:
            s.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
            s.setsockopt(socket.SOL_IP, IP_RECVORIGDSTADDR, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, port))
    except BaseException:
        s.close()
        raise
    return s


def transparent_tcp_listener(host: str = "127.0.0.1", port: int = 0, backlog: int = 128) -> socket.socket:
    """A TCP listener TPROXY can hand connections to; accepted sockets' getsockname() is the
    original destination."""
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    try:
        s.setsockopt(SOL_IPV6 if fam == socket.AF_INET6 else socket.SOL_IP,
                     IPV6_TRANSPARENT if fam == socket.AF_INET6 else IP_TRANSPARENT, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, port))
        s.listen(backlog)
    except BaseException:
        s.close()
        raise
    return s


def reply_socket(src: tuple[str, int], family: int = socket.AF_INET) -> socket.socket:
    """A UDP socket bound to a non-local address (the original server), so a transparent proxy
    can answer a TPROXYed datagram from the address the client asked."""
    s = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if family == socket.AF_INET6:
            s.setsockopt(SOL_IPV6, IPV6_TRANSPARENT, 1)
        else:
            s.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(src)
    except BaseException:
        s.close()
        raise
    return s
