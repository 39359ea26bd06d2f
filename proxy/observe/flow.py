"""Flow records shaped like Hubble's `flow.Flow` (spec §11.1), built from what l7gate observes.

Pure builders: an HTTP proxy event, a DNS proxy event or a logged kernel packet in, a list of
flow dicts out. The dicts use the proto JSON names (`UseProtoNames`) and proto3 JSON conventions:
zero values and empty lists are omitted, enums are names, 64-bit integers (`latency_ns`) are
strings, `is_reply` is a BoolValue (absent = unknown). They can be dumped as they are.

Which flows, as Hubble/Cilium emit them:
  HTTP  allowed  -> `http-request` FORWARDED, `http-response` FORWARDED (code, latency)
        denied   -> `http-request` DROPPED, `http-response` FORWARDED 403 (spec §8.2)
        protocol error (400/431, no verdict asked) -> `http-request` ERROR (+ response with the code)
  DNS   allowed  -> `dns-request proxy` FORWARDED, `dns-response proxy` FORWARDED
        denied   -> `dns-request proxy` DROPPED only (spec §9.2.7); error -> request ERROR only
  kernel drop    -> `policy-verdict:none <DIR>` DENIED, then `Policy denied` DROPPED
                    (or `Policy denied by denylist` for POLICY_DENY), like the Star Wars hubble lines
  kernel allow   -> `policy-verdict:<match> <DIR>` ALLOWED (when the datapath logs allowed
                    NEW connections; see `kernel_flows`)
Responses have source/destination swapped and `is_reply: true`, so the compact printer flips them
back and draws `<-`; kernel drops have no `is_reply` (`<>`).

Beyond Hubble: `ingress_allowed_by` / `egress_allowed_by` / `ingress_denied_by` /
`egress_denied_by` ({name, namespace, kind}) are set on every flow whose verdict a policy decided,
not only on policy-verdict events; and L7 policy denials carry `drop_reason_desc: POLICY_DENIED`
(Hubble leaves L7 drop reasons unset), so drop metrics and filters see them.

Endpoint details come from a `Resolver` (ip -> `EndpointInfo`) the agent supplies; the deciding
policies come with the proxy events (the oracle's `L7Result.policies`) or, for kernel packets,
from an `Explanation` the caller passes.
"""
from __future__ import annotations

import itertools
import time
import uuid as _uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable, Iterable

from proxy.observe.nflog import Packet

# Hubble enum values (flow.proto, pkg/monitor/api)
DROP_REASONS = {"POLICY_DENIED": 133, "POLICY_DENY": 181, "AUTH_REQUIRED": 189}
DROP_REASON_TEXT = {133: "Policy denied", 181: "Policy denied by denylist", 189: "Authentication required"}
EVENT_DROP, EVENT_TRACE, EVENT_POLICY_VERDICT, EVENT_L7 = 1, 4, 5, 129
MATCH_TYPES = {0: "none", 1: "L3-Only", 2: "L3-L4", 3: "L4-Only", 4: "all", 5: "L3-Proto", 6: "Proto-Only"}
TCP_FLAG_BITS = (("FIN", 0x01), ("SYN", 0x02), ("RST", 0x04), ("PSH", 0x08), ("ACK", 0x10),
                 ("URG", 0x20), ("ECE", 0x40), ("CWR", 0x80), ("NS", 0x100))  # proto field order
SUMMARY_FLAG_ORDER = ("SYN", "ACK", "RST", "FIN", "PSH", "URG", "ECE", "CWR", "NS")
RCODE_NAMES = {0: "No Error", 1: "Format Error", 2: "Server Failure", 3: "Non-Existent Domain",
               4: "Not Implemented", 5: "Query Refused", 6: "Name Exists when it should not",
               7: "RR Set Exists when it should not", 8: "RR Set that should exist does not",
               9: "Not Authorized", 10: "Name not contained in zone"}
ICMP4_TYPES = {0: "EchoReply", 3: "DestinationUnreachable", 4: "SourceQuench", 5: "Redirect",
               8: "EchoRequest", 9: "RouterAdvertisement", 10: "RouterSolicitation",
               11: "TimeExceeded", 12: "ParameterProblem", 13: "TimestampRequest",
               14: "TimestampReply"}
ICMP6_TYPES = {1: "DestinationUnreachable", 2: "PacketTooBig", 3: "TimeExceeded",
               4: "ParameterProblem", 128: "EchoRequest", 129: "EchoReply",
               130: "MLDv1MulticastListenerQuery", 131: "MLDv1MulticastListenerReport",
               132: "MLDv1MulticastListenerDone", 143: "MLDv2MulticastListenerReport",
               133: "RouterSolicitation", 134: "RouterAdvertisement",
               135: "NeighborSolicitation", 136: "NeighborAdvertisement", 137: "Redirect"}
EMITTER = {"name": "l7gate", "version": "0.1.0"}
# flow.proto field-number order, which is the order protojson writes
FIELD_ORDER = ("time", "verdict", "drop_reason", "IP", "l4", "source", "destination", "Type",
               "node_name", "source_names", "destination_names", "l7", "event_type",
               "traffic_direction", "policy_match_type", "drop_reason_desc", "is_reply", "uuid",
               "emitter", "egress_allowed_by", "ingress_allowed_by", "egress_denied_by",
               "ingress_denied_by", "Summary")


@dataclass(frozen=True)
class EndpointInfo:
    """What flows say about one address (Hubble's `Endpoint` + the DNS names known for it)."""
    identity: int
    labels: tuple[str, ...] = ()  # "k8s:app=x", "reserved:world", sorted
    namespace: str = ""
    pod_name: str = ""
    id: int = 0  # endpoint ID (Cilium's per-node endpoint number; 0 = none)
    names: tuple[str, ...] = ()  # FQDNs cached for this IP (source_names / destination_names)


Resolver = Callable[[str], "EndpointInfo | None"]


@dataclass(frozen=True)
class Explanation:
    """Which policies decided a kernel verdict, and Hubble's policy_match_type for allows."""
    policies: tuple[dict, ...] = ()  # [{kind, namespace, name}]
    match_type: int = 0


# Called for a logged kernel packet: (direction, peer ip, protocol, port) -> Explanation.
Explainer = Callable[[str, str, str, int], Explanation]


# -- helpers --------------------------------------------------------------------------------------
_last_second: list = [None, ""]  # (second, its text): flows come in bursts within one second
_last_base: list = [None, 0]


def _second_text(sec: int) -> str:
    if _last_second[0] != sec:
        _last_second[1] = datetime.fromtimestamp(sec, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
        _last_second[0] = sec
    return _last_second[1]


def rfc3339(time_ns: int) -> str:
    """RFC 3339 UTC with 0, 3, 6 or 9 fractional digits, as protojson prints a Timestamp."""
    sec, ns = divmod(int(time_ns), 1_000_000_000)
    base = _second_text(sec)
    if ns == 0:
        return base + "Z"
    if ns % 1_000_000 == 0:
        return f"{base}.{ns // 1_000_000:03d}Z"
    if ns % 1000 == 0:
        return f"{base}.{ns // 1000:06d}Z"
    return f"{base}.{ns:09d}Z"


def parse_time(text: str) -> int:
    """Nanoseconds since the epoch of an RFC 3339 time (`Z` or an offset; 0-9 fraction digits)."""
    if len(text) >= 20 and text[-1] == "Z" and text[19] in ".Z" and text[:19] == _last_base[0]:
        frac = text[20:-1]  # the fast path: our own format, same second as the last one parsed
        if frac.isdigit() and len(frac) <= 9 or not frac:
            return _last_base[1] + (int(frac.ljust(9, "0")) if frac else 0)
    text = text.strip()
    frac_ns = 0
    main, tz = text, ""
    if text.endswith(("Z", "z")):
        main, tz = text[:-1], "+00:00"
    elif len(text) > 6 and text[-6] in "+-" and text[-3] == ":":
        main, tz = text[:-6], text[-6:]
    if "." in main:
        main, frac = main.split(".", 1)
        if not frac.isdigit() or len(frac) > 9:
            raise ValueError(f"bad fractional seconds in {text!r}")
        frac_ns = int(frac.ljust(9, "0"))
    dt = datetime.fromisoformat(main.replace("t", "T") + (tz or "+00:00"))
    base_ns = int(dt.timestamp()) * 1_000_000_000
    if tz == "+00:00" and len(main) == 19:
        _last_base[0], _last_base[1] = main, base_ns
    return base_ns + frac_ns


_UUID_PREFIX = _uuid.uuid4().hex[:20]
_uuid_counter = itertools.count(1)


def new_uuid() -> str:
    """A flow id in UUID form: a random per-process prefix and a counter (uuid4() costs 4 us)."""
    p = _UUID_PREFIX
    return f"{p[:8]}-{p[8:12]}-4{p[13:16]}-a{p[17:20]}-{next(_uuid_counter) & 0xFFFFFFFFFFFF:012x}"


def _ip_version(ip: str) -> str:
    return "IPv6" if ":" in ip else "IPv4"


def _plain(ip: str) -> str:
    if not ip:
        return ""
    if "%" in ip:
        ip = ip.split("%", 1)[0]
    return ip[7:] if ip.startswith("::ffff:") and "." in ip else ip


def endpoint_dict(info: EndpointInfo | None) -> dict:
    if info is None:
        return {}
    d: dict = {}
    if info.id:
        d["ID"] = info.id
    if info.identity:
        d["identity"] = info.identity
    if info.namespace:
        d["namespace"] = info.namespace
    if info.labels:
        d["labels"] = sorted(info.labels)
    if info.pod_name:
        d["pod_name"] = info.pod_name
    return d


def policy_list(policies: Iterable[dict]) -> list[dict]:
    """[{name, namespace, kind}] without duplicates, in the order given."""
    out, seen = [], set()
    for p in policies or ():
        item = {"name": p.get("name", "")}
        if p.get("namespace"):
            item["namespace"] = p["namespace"]
        item["kind"] = p.get("kind", "")
        key = (item["name"], item.get("namespace", ""), item["kind"])
        if key not in seen:
            seen.add(key)
            out.append(item)
    return out


def tcp_flags_dict(bits: int) -> dict:
    return {name: True for name, bit in TCP_FLAG_BITS if bits & bit}


def l4_dict(proto: str, sport: int = 0, dport: int = 0, tcp_flags: int | None = None,
            icmp_type: int | None = None, icmp_code: int | None = None) -> dict:
    if proto in ("TCP", "UDP", "SCTP"):
        inner: dict = {}
        if sport:
            inner["source_port"] = sport
        if dport:
            inner["destination_port"] = dport
        if proto == "TCP" and tcp_flags:
            inner["flags"] = tcp_flags_dict(tcp_flags)
        return {proto: inner}
    if proto in ("ICMPv4", "ICMPv6"):
        inner = {}
        if icmp_type:
            inner["type"] = icmp_type
        if icmp_code:
            inner["code"] = icmp_code
        return {proto: inner}
    return {}


def l4_summary(l4: dict, ip_version: str = "IPv4") -> str:
    """Hubble's L3/L4 summary: `TCP Flags: SYN`, `UDP`, `ICMPv4 EchoRequest`."""
    if "TCP" in l4:
        flags = l4["TCP"].get("flags", {})
        return "TCP Flags: " + ", ".join(f for f in SUMMARY_FLAG_ORDER if flags.get(f))
    if "UDP" in l4:
        return "UDP"
    if "SCTP" in l4:
        return "SCTP"
    for name, table in (("ICMPv4", ICMP4_TYPES), ("ICMPv6", ICMP6_TYPES)):
        if name in l4:
            t = l4[name].get("type", 0)
            return f"{name} {table.get(t, str(t))}"
    return ip_version


def _resolve(resolve: Resolver | None, ip: str) -> EndpointInfo | None:
    if resolve is None or not ip:
        return None
    try:
        return resolve(ip)
    except Exception:  # a resolver failure costs the labels, never the flow
        return None


def _new_flow(time_ns: int, verdict: str, src_ip: str, dst_ip: str, l4: dict,
              src: EndpointInfo | None, dst: EndpointInfo | None, flow_type: str,
              node_name: str) -> dict:
    f: dict = {"time": rfc3339(time_ns), "uuid": new_uuid(), "verdict": verdict}
    if src_ip or dst_ip:
        f["IP"] = {"source": src_ip, "destination": dst_ip, "ipVersion": _ip_version(src_ip or dst_ip)}
    if l4:
        f["l4"] = l4
    f["source"] = endpoint_dict(src)
    f["destination"] = endpoint_dict(dst)
    f["Type"] = flow_type
    if node_name:
        f["node_name"] = node_name
    if src is not None and src.names:
        f["source_names"] = list(src.names)
    if dst is not None and dst.names:
        f["destination_names"] = list(dst.names)
    return f


def _finish(f: dict, *, direction: str, is_reply: bool | None, event_type: dict, summary: str,
            policies: Iterable[dict] = (), allowed: bool = True, drop_reason: str = "",
            match_type: int = 0) -> dict:
    if drop_reason:
        f["drop_reason"] = DROP_REASONS.get(drop_reason, 0)
    f["event_type"] = event_type
    if direction in ("ingress", "egress"):
        f["traffic_direction"] = direction.upper()
    if match_type:
        f["policy_match_type"] = match_type
    if drop_reason:
        f["drop_reason_desc"] = drop_reason
    if is_reply is not None:
        f["is_reply"] = is_reply
    f["emitter"] = dict(EMITTER)
    plist = policy_list(policies)
    if plist and direction in ("ingress", "egress"):
        f[f"{direction}_{'allowed' if allowed else 'denied'}_by"] = plist
    f["Summary"] = summary
    ordered = {k: f[k] for k in FIELD_ORDER if k in f}
    if len(ordered) != len(f):
        ordered.update((k, v) for k, v in f.items() if k not in ordered)
    f.clear()
    f.update(ordered)
    return f


def _reply_of(f: dict) -> tuple[str, str, dict]:
    """IP addresses and l4 of the opposite direction."""
    ip = f.get("IP", {})
    l4 = {}
    for proto, inner in f.get("l4", {}).items():
        swapped = {}
        if "destination_port" in inner:
            swapped["source_port"] = inner["destination_port"]
        if "source_port" in inner:
            swapped["destination_port"] = inner["source_port"]
        l4[proto] = swapped
    return ip.get("destination", ""), ip.get("source", ""), l4


def event_time_ns(event: dict, now_ns: int | None) -> int:
    t = event.get("time")
    if t is None:
        return now_ns if now_ns is not None else time.time_ns()
    if isinstance(t, int) and t >= 10**12:  # already nanoseconds
        return t
    return round(float(t) * 1_000_000) * 1000  # time.time(): microseconds are all a float holds


# -- HTTP -----------------------------------------------------------------------------------------
def http_latency_ns(event: dict) -> int:
    """An HTTP event's response latency (the RESPONSE flow's `latency_ns`)."""
    return max(0, int(round(float(event.get("latency_ms") or 0) * 1_000_000)))


def http_flows(event: dict, resolve: Resolver | None = None, node_name: str = "",
               now_ns: int | None = None) -> list[dict]:
    """An HTTP proxy event (`proxy.l7.http`: method, url, protocol, verdict, code, latency_ms,
    policies, time, direction, src_ip/src_port = client, dst_ip/dst_port = original server)
    -> [request] or [request, response]."""
    end_ns = event_time_ns(event, now_ns)
    latency_ns = http_latency_ns(event)
    code = event.get("code")
    direction = event.get("direction", "")
    policies = event.get("policies") or ()
    if event.get("verdict") == "FORWARDED":
        verdict, allowed = "FORWARDED", True
    elif code == 403 or policies:  # the policy said no: Cilium's 403
        verdict, allowed = "DROPPED", False
    else:  # refused before any verdict (malformed, too large, HTTP/2 prior knowledge)
        verdict, allowed = "ERROR", False
    src_ip, dst_ip = _plain(event.get("src_ip", "")), _plain(event.get("dst_ip", ""))
    src, dst = _resolve(resolve, src_ip), _resolve(resolve, dst_ip)
    method, url, protocol = event.get("method") or "", event.get("url") or "", event.get("protocol") or ""
    http: dict = {}
    if method:
        http["method"] = method
    if url:
        http["url"] = url
    if protocol:
        http["protocol"] = protocol
    headers = event.get("headers")
    if headers:
        pairs = headers.items() if isinstance(headers, dict) else headers
        http["headers"] = [{"key": k, "value": v} for k, v in sorted(pairs, key=lambda kv: kv[0])]
    l4 = l4_dict("TCP", int(event.get("src_port") or 0), int(event.get("dst_port") or 0))
    request_line = f"{method} {url}".strip()
    req = _new_flow(end_ns - latency_ns, verdict, src_ip, dst_ip, l4, src, dst, "L7", node_name)
    req["l7"] = {"type": "REQUEST", "http": http}
    _finish(req, direction=direction, is_reply=False, event_type={"type": EVENT_L7},
            summary=f"{protocol} {request_line}".strip(), policies=policies, allowed=allowed,
            drop_reason="POLICY_DENIED" if verdict == "DROPPED" else "")
    if code is None:
        return [req]
    # Cilium's Envoy access log stamps both entries with the request's start time
    resp = _response(req, end_ns - latency_ns, src, dst, node_name, latency_ns,
                     {"http": {"code": int(code), **http}}, direction, policies, allowed,
                     f"{protocol} {int(code)} {latency_ns // 1_000_000}ms ({request_line})")
    return [req, resp]


def _response(req: dict, time_ns: int, src, dst, node_name: str, latency_ns: int, l7: dict,
              direction: str, policies, allowed: bool, summary: str) -> dict:
    """The RESPONSE flow that answers `req` (source and destination swapped, is_reply)."""
    r_src, r_dst, r_l4 = _reply_of(req)
    resp = _new_flow(time_ns, "FORWARDED", r_src, r_dst, r_l4, dst, src, "L7", node_name)
    resp["l7"] = {"type": "RESPONSE", **l7}
    if latency_ns:
        resp["l7"]["latency_ns"] = str(latency_ns)
    _finish(resp, direction=direction, is_reply=True, event_type={"type": EVENT_L7},
            summary=summary, policies=policies, allowed=allowed)
    return resp


# -- DNS ------------------------------------------------------------------------------------------
def dns_flows(event: dict, resolve: Resolver | None = None, node_name: str = "",
              now_ns: int | None = None) -> list[dict]:
    """A DNS proxy event (`proxy.l7.dns`: qname, qtypes, verdict, rcode, ips, ttl, cnames,
    rrtypes, policies, latency_ns, src = the workload, dst = the server it asked)
    -> [request, response] when relayed, [request] when denied or failed."""
    end_ns = event_time_ns(event, now_ns)
    latency_ns = max(0, int(event.get("latency_ns") or 0))
    verdict = event.get("verdict", "")
    allowed = verdict == "FORWARDED"
    direction = event.get("direction", "egress")
    policies = event.get("policies") or ()
    proto = "TCP" if str(event.get("protocol", "UDP")).upper() == "TCP" else "UDP"
    src_ip, dst_ip = _plain(event.get("src_ip", "")), _plain(event.get("dst_ip", ""))
    src, dst = _resolve(resolve, src_ip), _resolve(resolve, dst_ip)
    qname = event.get("qname") or ""
    qtypes = list(event.get("qtypes") or [])
    qtype_text = ",".join(qtypes)
    l4 = l4_dict(proto, int(event.get("src_port") or 0), int(event.get("dst_port") or 0))
    dns: dict = {}
    if qname:
        dns["query"] = qname
    dns["observation_source"] = "proxy"
    if qtypes:
        dns["qtypes"] = qtypes
    req_verdict = verdict if verdict in ("FORWARDED", "DROPPED", "ERROR") else "ERROR"
    req = _new_flow(end_ns - latency_ns if allowed else end_ns, req_verdict, src_ip, dst_ip, l4,
                    src, dst, "L7", node_name)
    req["l7"] = {"type": "REQUEST", "dns": dns}
    denied_by_policy = verdict == "DROPPED" and bool(policies or qname)
    _finish(req, direction=direction, is_reply=False, event_type={"type": EVENT_L7},
            summary=f"DNS Query {qname} {qtype_text}", policies=policies,
            allowed=allowed, drop_reason="POLICY_DENIED" if denied_by_policy else "")
    if not allowed:
        return [req]
    rcode = int(event.get("rcode") or 0)
    ips = list(event.get("ips") or [])
    cnames = list(event.get("cnames") or [])
    ttl = int(event.get("ttl") or 0)
    answer: dict = {}
    if qname:
        answer["query"] = qname
    if ips:
        answer["ips"] = ips
    if ttl:
        answer["ttl"] = ttl
    if cnames:
        answer["cnames"] = cnames
    answer["observation_source"] = "proxy"
    if rcode:
        answer["rcode"] = rcode
    if qtypes:
        answer["qtypes"] = qtypes
    if event.get("rrtypes"):
        answer["rrtypes"] = list(event["rrtypes"])
    if rcode:
        text = f"RCode: {RCODE_NAMES.get(rcode, str(rcode))}"
    else:
        parts = []
        if ips:
            parts.append('"' + ",".join(ips) + '"')
        if cnames:
            parts.append('CNAMEs: "' + ",".join(cnames) + '"')
        text = " ".join(parts)
    resp = _response(req, end_ns, src, dst, node_name, latency_ns, {"dns": answer}, direction,
                     policies, True, f"DNS Answer {text} TTL: {ttl} (Proxy {qname} {qtype_text})")
    return [req, resp]


def proxy_flows(event: dict, resolve: Resolver | None = None, node_name: str = "",
                now_ns: int | None = None) -> list[dict]:
    """Either proxy's event: DNS events say `type: dns`, HTTP events have no type."""
    if event.get("type") == "dns":
        return dns_flows(event, resolve, node_name, now_ns)
    return http_flows(event, resolve, node_name, now_ns)


def proxy_flow_count(event: dict) -> int:
    """How many flows `proxy_flows(event)` builds: the request, and its response when there is
    one (HTTP: an answer code; DNS: a relayed query)."""
    if event.get("type") == "dns":
        return dns_flow_count(event.get("verdict", ""))
    return http_flow_count(event.get("code"))


def http_flow_count(code: int | None) -> int:
    return 1 if code is None else 2


def dns_flow_count(verdict: str) -> int:
    return 2 if verdict == "FORWARDED" else 1


_POLICY_KEYS: dict[int, tuple] = {}  # id(policy dict, or tuple of them) -> (it, its key)


def _memoised(obj, make: Callable[[object], tuple]) -> tuple:
    """make(obj), remembered per object: the oracles cache their results, so the same few
    policy dicts and tuples come back on every request (sorting them each time cost ~1 us)."""
    found = _POLICY_KEYS.get(id(obj))
    if found is not None and found[0] is obj:
        return found[1]
    if len(_POLICY_KEYS) >= 4096:
        _POLICY_KEYS.clear()
    key = make(obj)
    _POLICY_KEYS[id(obj)] = (obj, key)
    return key


def _policy_key(p: dict) -> tuple:
    return _memoised(p, lambda d: tuple(sorted(d.items())))


def policies_key(policies) -> tuple:
    """The deciding policies (dicts) as a hashable key."""
    if not policies:
        return ()
    if type(policies) is tuple:  # an oracle's cached result: the same tuple every time
        return _memoised(policies, lambda ps: tuple(map(_policy_key, ps)))
    return tuple(map(_policy_key, policies))


def proxy_event_kind(event: dict) -> tuple:
    """What of a proxy event its flows' *metrics* depend on: everything `Metrics.observe` reads
    from those flows except the HTTP latency (addresses, ports, names, URLs and times do not
    count). Events of one kind give flows that count in the same series."""
    if event.get("type") == "dns":
        return dns_event_kind(event.get("verdict", ""), event.get("direction", "egress"),
                              event.get("policies"), str(event.get("protocol", "UDP")),
                              event.get("qtypes") or (), len(event.get("ips") or ()),
                              event.get("rcode"), event.get("rrtypes") or (), event.get("qname"))
    return http_event_kind(event.get("verdict"), event.get("code"), event.get("direction", ""),
                           event.get("policies"), event.get("method"), event.get("protocol"))


def http_event_kind(verdict: str | None, code: int | None, direction: str, policies,
                    method: str | None, protocol: str | None) -> tuple:
    """`proxy_event_kind` of an HTTP event, from its fields (proxies call it without a dict)."""
    return ("http", verdict, code, direction, policies_key(policies), method or "", protocol or "")


def dns_event_kind(verdict: str, direction: str, policies, protocol: str, qtypes: Iterable[str],
                   ips: int, rcode: int | None, rrtypes: Iterable[str], qname: str | None) -> tuple:
    """`proxy_event_kind` of a DNS event, from its fields (`ips`: how many)."""
    return ("dns", verdict, direction, policies_key(policies), protocol.upper(), tuple(qtypes),
            ips, int(rcode or 0), tuple(rrtypes), bool(qname))


class ProxyEvent(Mapping):
    """A proxy's event, kept without being built: the observer reads only `time_ns`, `src_ip`,
    `dst_ip`, `kind` (`proxy_event_kind`), `flow_count` (`proxy_flow_count`) and
    `http_latency_ns`; the event dict (what `proxy_flows` reads) is built the first time anyone
    reads the event as a mapping. A proxy sends one of these or a plain dict (`DictEvent` wraps
    it). A dict per request cost the HTTP proxy more than its own work on the request, once
    the ring held thousands of them.

    Its flows, likewise, are built the first time one of them is read (`flows()`): most never
    are (the ring forgets them first). The peers are resolved at once (`resolve_peers`): a
    flow shows the identities of when it happened."""
    __slots__ = ("_dict", "_peers", "_node_name", "_flows")
    time_ns: int
    src_ip: str
    dst_ip: str
    kind: tuple
    flow_count: int
    http_latency_ns: int

    def build(self) -> dict:
        raise NotImplementedError

    def as_dict(self) -> dict:
        d = self._dict
        if d is None:
            d = self._dict = self.build()
        return d

    def __getitem__(self, key: str):
        return self.as_dict()[key]

    def __iter__(self):
        return iter(self.as_dict())

    def __len__(self) -> int:
        return len(self.as_dict())

    def resolve_peers(self, resolve: Resolver | None, node_name: str = "") -> None:
        src, dst = _plain(self.src_ip), _plain(self.dst_ip)
        self._peers = (src, _resolve(resolve, src), dst, _resolve(resolve, dst))
        self._node_name = node_name
        self._flows = None

    def flows(self) -> list[dict]:
        flows = self._flows
        if flows is None:
            src, src_info, dst, dst_info = self._peers
            peers = {src: src_info, dst: dst_info}
            flows = self._flows = proxy_flows(self.as_dict(), peers.get, self._node_name)
        return flows


class DictEvent(ProxyEvent):
    """A proxy event given as a dict (the DNS proxy's, tests')."""
    __slots__ = ("time_ns", "src_ip", "dst_ip", "kind", "flow_count", "http_latency_ns")

    def __init__(self, event: dict) -> None:
        self.time_ns = event_time_ns(event, None)
        event.setdefault("time", self.time_ns)  # built later, the flows keep the event's time
        self._dict = event
        self.src_ip, self.dst_ip = event.get("src_ip", ""), event.get("dst_ip", "")
        self.kind = proxy_event_kind(event)
        self.flow_count = proxy_flow_count(event)
        self.http_latency_ns = http_latency_ns(event)


# -- kernel ---------------------------------------------------------------------------------------
def kernel_flows(pkt: Packet, resolve: Resolver | None = None, node_name: str = "",
                 explanation: Explanation | None = None, direction: str = "",
                 reason: str = "") -> list[dict]:
    """A packet the datapath logged (NFLOG, prefix `l7gate:<direction>:<reason>`, mark = peer
    identity) -> flows. reason POLICY_DENIED / POLICY_DENY: [policy-verdict DENIED, drop];
    reason ALLOWED (or anything not a drop reason): [policy-verdict ALLOWED] (is_reply false,
    `policy_match_type` from the explanation). [] when the packet is not one of ours."""
    direction = direction or pkt.direction
    reason = reason or pkt.reason
    if direction not in ("ingress", "egress") or not (pkt.src or pkt.dst):
        return []
    explanation = explanation or Explanation()
    src, dst = _resolve(resolve, pkt.src), _resolve(resolve, pkt.dst)
    peer_ip, peer = (pkt.src, src) if direction == "ingress" else (pkt.dst, dst)
    if pkt.mark and (peer is None or peer.identity != pkt.mark):
        # the mark is what the datapath decided on; labels only if they describe that identity
        peer = EndpointInfo(pkt.mark, peer.labels if peer and peer.identity == pkt.mark else (),
                            peer.namespace if peer else "", peer.pod_name if peer else "",
                            peer.id if peer else 0, peer.names if peer else ())
        if direction == "ingress":
            src = peer
        else:
            dst = peer
    l4 = l4_dict(pkt.proto, pkt.sport, pkt.dport, pkt.tcp_flags, pkt.icmp_type, pkt.icmp_code)
    summary = l4_summary(l4, _ip_version(pkt.src or pkt.dst))
    denied = reason in DROP_REASONS
    verdict = "DROPPED" if denied else "FORWARDED"
    pv = _new_flow(pkt.time_ns, verdict, pkt.src, pkt.dst, l4, src, dst, "L3_L4", node_name)
    _finish(pv, direction=direction, is_reply=None if denied else False,
            event_type={"type": EVENT_POLICY_VERDICT}, summary=summary,
            policies=explanation.policies, allowed=not denied,
            drop_reason=reason if denied else "",
            match_type=0 if denied else explanation.match_type)
    if not denied:
        return [pv]
    code = DROP_REASONS[reason]
    drop = _new_flow(pkt.time_ns, "DROPPED", pkt.src, pkt.dst, l4, src, dst, "L3_L4", node_name)
    _finish(drop, direction=direction, is_reply=None,
            event_type={"type": EVENT_DROP, "sub_type": code}, summary=summary,
            policies=explanation.policies, allowed=False, drop_reason=reason)
    return [pv, drop]


# -- reading flows back ---------------------------------------------------------------------------
def flow_type_name(f: dict) -> str:
    """The TYPE column: `http-request`, `dns-response proxy`, `Policy denied`,
    `policy-verdict:none INGRESS`, `to-endpoint`, ... (hubble's GetFlowType)."""
    l7 = f.get("l7")
    if l7 is not None:
        kind = l7.get("type", "UNKNOWN").lower()
        if "http" in l7:
            return f"http-{kind}"
        if "dns" in l7:
            return f"dns-{kind} {l7['dns'].get('observation_source', '')}".rstrip()
        if "kafka" in l7:
            return f"kafka-{kind}"
        return f"l7-{kind}"
    et = f.get("event_type", {})
    t = et.get("type", 0)
    if t == EVENT_DROP:
        code = et.get("sub_type", f.get("drop_reason", 0))
        return DROP_REASON_TEXT.get(code, f"drop reason {code}")
    if t == EVENT_POLICY_VERDICT:
        match = MATCH_TYPES.get(f.get("policy_match_type", 0), "unknown")
        return f"policy-verdict:{match} {f.get('traffic_direction', 'TRAFFIC_DIRECTION_UNKNOWN')}"
    if t == EVENT_TRACE:
        return f.get("trace_observation_point", "UNKNOWN").lower().replace("_", "-")
    return "UNKNOWN"


def protocol_of(f: dict) -> str:
    """Hubble's FlowProtocol: the L7 protocol if any (`HTTP`, `DNS`), else the L4 one."""
    l7 = f.get("l7")
    if l7 is not None:
        for key, name in (("http", "HTTP"), ("dns", "DNS"), ("kafka", "Kafka")):
            if key in l7:
                return name
    for name in ("TCP", "UDP", "ICMPv4", "ICMPv6", "SCTP"):
        if name in f.get("l4", {}):
            return name
    return "Unknown"
