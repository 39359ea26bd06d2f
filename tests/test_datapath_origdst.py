"""Original-destination helpers: sockaddr parsing as data, and the getsockopt edge."""
import socket
import struct

import pytest

from proxy.datapath import origdst


def sockaddr_in(ip: str, port: int) -> bytes:
    return struct.pack("=H", socket.AF_INET) + struct.pack("!H", port) + socket.inet_aton(ip) + b"\0" * 8


def sockaddr_in6(ip: str, port: int) -> bytes:
    return (struct.pack("=H", socket.AF_INET6) + struct.pack("!HI", port, 0)
            + socket.inet_pton(socket.AF_INET6, ip) + b"\0" * 4)


def test_sockaddr_in_is_parsed_to_ip_and_port():
    assert origdst.parse_sockaddr_in(sockaddr_in("10.0.0.2", 8080)) == ("10.0.0.2", 8080)


def test_sockaddr_in6_is_parsed_to_ip_and_port():
    assert origdst.parse_sockaddr_in6(sockaddr_in6("2001:db8::5", 53)) == ("2001:db8::5", 53)


def test_the_wrong_family_or_a_short_buffer_is_an_error():
    with pytest.raises(ValueError):
        origdst.parse_sockaddr_in(sockaddr_in6("::1", 1))
    with pytest.raises(ValueError):
        origdst.parse_sockaddr_in(b"\x02\x00")


def test_ancillary_data_gives_the_original_destination():
    anc = [(socket.SOL_IP, origdst.IP_RECVORIGDSTADDR, sockaddr_in("10.77.0.2", 53))]
    assert origdst.orig_dst_from_ancdata(anc) == ("10.77.0.2", 53)
    anc6 = [(origdst.SOL_IPV6, origdst.IPV6_RECVORIGDSTADDR, sockaddr_in6("::ffff:10.0.0.9", 53))]
    assert origdst.orig_dst_from_ancdata(anc6) == ("10.0.0.9", 53), "v4-mapped comes back as IPv4"
    assert origdst.orig_dst_from_ancdata([]) is None


def test_a_connection_that_was_not_redirected_has_only_its_own_destination():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    with srv, socket.create_connection(srv.getsockname()), srv.accept()[0] as conn:
        try:
            got = origdst.original_dst(conn)
        except OSError:
            return  # not tracked by conntrack here: nothing to ask
        assert got == conn.getsockname()  # tracked but not NATed: the address it has
