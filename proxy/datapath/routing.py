"""Policy routing that brings locally generated packets back in through prerouting via lo.

Two marks use it, both set by the table's route chain:
* DNS_TPROXY_MARK: TPROXY only exists in prerouting, but a workload's DNS queries are generated
  locally (output). Routed to lo, they meet the `dns_tproxy` chain on the way in.
* EGRESS_DROP_MARK: a denied egress packet. Dropping it in the output hook would return EPERM to
  the sender (UDP sendto and ping fail at once instead of hanging); routed to lo, it is dropped
  on the receive path, where nobody is told.

    ip rule add fwmark DNS_TPROXY_MARK lookup DNS_TPROXY_TABLE
    ip rule add fwmark EGRESS_DROP_MARK lookup DNS_TPROXY_TABLE
    ip route add local 0.0.0.0/0 dev lo table DNS_TPROXY_TABLE        (and the same for IPv6)

Without these, the table's postrouting chain still drops both kinds (fail closed; the sender
then sees EPERM).

Runs once at agent start, with the `ip` command (iproute2), in the caller's network namespace.
`install` and `remove` are idempotent. IPv6 is best effort: a namespace without IPv6 is fine.
"""
from __future__ import annotations

import json
import subprocess

from proxy.datapath.constants import DNS_TPROXY_MARK, DNS_TPROXY_TABLE, EGRESS_DROP_MARK

MARKS = (DNS_TPROXY_MARK, EGRESS_DROP_MARK)


class RoutingError(RuntimeError):
    pass


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise RoutingError(f"ip {' '.join(args)}: {proc.stderr.strip()}")
    return proc


def _rules(family: str, mark: int, table: int) -> int:
    """How many `fwmark mark lookup table` rules exist."""
    proc = _ip(family, "-j", "rule", "show", check=False)
    if proc.returncode != 0 or not proc.stdout.strip():
        return 0
    n = 0
    for r in json.loads(proc.stdout):
        fwmark = r.get("fwmark")
        if fwmark is None or int(str(fwmark), 0) != mark or r.get("fwmask", "0xffffffff") != "0xffffffff":
            continue
        if str(r.get("table")) == str(table):
            n += 1
    return n


def _families(ipv6: bool) -> list[tuple[str, str]]:
    fams = [("-4", "0.0.0.0/0")]
    if ipv6:
        fams.append(("-6", "::/0"))
    return fams


def install(table: int = DNS_TPROXY_TABLE, marks: tuple[int, ...] = MARKS, ipv6: bool = True) -> None:
    """Add the rules and the local route once, whatever was there before."""
    for fam, default in _families(ipv6):
        try:
            _ip(fam, "route", "replace", "local", default, "dev", "lo", "table", str(table))
            for mark in marks:
                if _rules(fam, mark, table) == 0:
                    _ip(fam, "rule", "add", "fwmark", hex(mark), "lookup", str(table))
        except RoutingError:
            if fam == "-4":
                raise
            # IPv6 disabled in this namespace: nothing to intercept there


def remove(table: int = DNS_TPROXY_TABLE, marks: tuple[int, ...] = MARKS, ipv6: bool = True) -> None:
    """Delete every copy of the rules and flush the table; missing pieces are not an error."""
    for fam, _ in _families(ipv6):
        for mark in marks:
            for _ in range(_rules(fam, mark, table)):
                _ip(fam, "rule", "del", "fwmark", hex(mark), "lookup", str(table), check=False)
        _ip(fam, "route", "flush", "table", str(table), check=False)


def installed(table: int = DNS_TPROXY_TABLE, marks: tuple[int, ...] = MARKS) -> bool:
    """Is the IPv4 half in place (rules and route)?"""
    if any(_rules("-4", mark, table) == 0 for mark in marks):
        return False
    proc = _ip("-4", "route", "show", "table", str(table), check=False)
    return proc.returncode == 0 and "local default dev lo" in proc.stdout
