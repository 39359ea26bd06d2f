"""`l7gate trace`: explain the verdict for one flow, in the vocabulary of `cilium policy trace`.

Exit 0 when the flow is allowed, 2 when denied, 1 when the input cannot be used. Invalid policy
documents are reported on stderr and left out, as the agent would keep them out of force.
"""
from __future__ import annotations

import json
import sys

from proxy.fqdn.cache import DNSCache
from proxy.policy import httpmatch
from proxy.policy.endpoint import EndpointsFileError, load_endpoints_file
from proxy.policy.engine import Engine, FlowVerdict, Peer, PeerError, SideVerdict
from proxy.policy.repository import AUTH_REQUIRED, UNCHECKED_L7, Options
from proxy.policy.load import load_paths

PROTOCOLS = {"tcp": "TCP", "udp": "UDP", "sctp": "SCTP", "icmp": "ICMP", "icmpv4": "ICMP",
             "icmpv6": "ICMPv6"}


class TraceInputError(ValueError):
    pass


def parse_dport(text: str) -> tuple[str, int]:
    port, _, proto = text.partition("/")
    proto_name = PROTOCOLS.get((proto or "tcp").lower())
    if proto_name is None:
        raise TraceInputError(f"--dport: unknown protocol {proto!r} (TCP, UDP, SCTP, ICMP, ICMPv6)")
    limit = 255 if proto_name.startswith("ICMP") else 65535
    if not port.isdigit() or not 0 <= int(port) <= limit:
        raise TraceInputError(f"--dport: {port!r} is not a port (0-{limit})")
    return proto_name, int(port)


def http_request(args) -> httpmatch.HTTPRequest | None:
    if not (args.http_method or args.http_path or args.http_host or args.http_header):
        return None
    headers = []
    for h in args.http_header:
        k, sep, v = h.partition("=")
        if not sep or not k:
            raise TraceInputError(f"--http-header {h!r}: expected K=V")
        headers.append((k, v))
    host = args.http_host or ""
    if host:
        headers.append(("Host", host))
    return httpmatch.HTTPRequest(method=args.http_method or "GET", path=args.http_path or "/",
                                 host=host, headers=tuple(headers))


def run(args, out) -> int:
    try:
        verdict, request = _trace(args)
    except (TraceInputError, PeerError, EndpointsFileError, ValueError) as e:
        print(f"l7gate trace: {e}", file=sys.stderr)
        return 1
    if args.output == "json":
        json.dump(to_json(verdict, request, args.dns_name), out, indent=2)
        out.write("\n")
    else:
        out.write(to_text(verdict, request, args.dns_name))
    return 0 if verdict.allowed else 2


def _trace(args) -> tuple[FlowVerdict, httpmatch.HTTPRequest | None]:
    result = load_paths(args.policies)
    for doc in result.documents:
        for err in doc.errors:
            print(f"warning: policy not in force: {err}", file=sys.stderr)
    endpoints, services = load_endpoints_file(args.endpoints) if args.endpoints else ([], [])
    cache = DNSCache.from_pairs(args.fqdn_cache)
    options = Options(enforcement=getattr(args, "policy_enforcement", "default"))
    engine = Engine(result.policies, endpoints, services, cache, options)
    proto, port = parse_dport(args.dport)
    request = http_request(args)
    if request is not None:
        path = httpmatch.normalize_path(request.path)
        if path is None:
            raise TraceInputError(f"--http-path {request.path!r}: the proxy rejects it with 400")
        request = httpmatch.HTTPRequest(request.method, path, request.host, request.headers)
    src, dst = engine.peer(args.src), engine.peer(args.dst)
    return engine.evaluate(src, dst, proto, port, request, args.dns_name), request


# ---- JSON ----------------------------------------------------------------------------------

def _peer_json(p: Peer) -> dict:
    return {"name": p.name, "identity": p.identity.id, "labels": p.identity.labels.strings(),
            "ip": p.ip, "local": p.local}


def _side_json(s: SideVerdict) -> dict:
    if not s.evaluated:
        return {"verdict": "skipped", "enforced": False, "drop_reason": None, "redirect": False,
                "decided_by": [], "l7": None}
    d = s.decision
    l7 = None
    if s.l7 is not None:
        l7 = {"type": s.l7.kind, "verdict": _tri(s.l7.allowed), "allow_all": s.l7.allow_all,
              "matched": [o.as_dict() for o in s.l7.matched],
              "rules": [{"rule": text, **o.as_dict()} for text, o in s.l7.rules]}
    return {"verdict": "allowed" if d.allowed else "denied", "enforced": d.enforced,
            "drop_reason": d.drop_reason, "redirect": d.redirect,
            "decided_by": [o.as_dict() for o in d.deciders], "l7": l7}


def _tri(v: bool | None) -> str | None:
    return None if v is None else ("allowed" if v else "denied")


def responsible(v: FlowVerdict) -> list[dict]:
    """The policies behind the verdict: the denying side's, or every side's that allowed."""
    origins = []
    sides = [s for s in (v.egress, v.ingress) if s.evaluated]
    denying = [s for s in sides if not s.allowed]
    for s in denying or sides:
        if s.l7 is not None and s.l7.allowed is False:
            origins += [o for _, o in s.l7.rules]
        elif s.decision.enforced:
            origins += list(s.decision.deciders)
            if s.l7 is not None:
                origins += s.l7.matched
    seen, out = set(), []
    for o in origins:
        key = (o.ref.kind, o.ref.namespace, o.ref.name)
        if key not in seen and o.ref.kind != "reserved":
            seen.add(key)
            out.append(o.ref.as_dict())
    return out


def _denied_at(v: FlowVerdict) -> tuple[str | None, str | None]:
    for s in (v.egress, v.ingress):
        if s.evaluated and not s.decision.allowed:
            return s.direction, "L3/L4"
    for s in (v.egress, v.ingress):
        if s.l7 is not None and s.l7.allowed is False:
            return s.direction, "L7"
    return None, None


def to_json(v: FlowVerdict, request, dns_name) -> dict:
    l7_sides = [s.l7 for s in (v.egress, v.ingress) if s.l7 is not None]
    checked = [x.allowed for x in l7_sides if x.allowed is not None]
    l7 = {"type": l7_sides[0].kind if l7_sides else None,
          "verdict": None if not checked else ("allowed" if all(checked) else "denied"),
          "request": _request_json(request, dns_name)}
    direction, layer = _denied_at(v)
    return {"verdict": "allowed" if v.allowed else "denied",
            "denied_by": direction, "denied_at": layer,
            "source": _peer_json(v.src), "destination": _peer_json(v.dst),
            "protocol": v.proto, "dport": v.port,
            "egress": _side_json(v.egress), "ingress": _side_json(v.ingress),
            "l7": l7, "policies": responsible(v)}


def _request_json(request, dns_name) -> dict | None:
    if request is not None:
        return {"method": request.method, "path": request.path, "host": request.host,
                "headers": [list(h) for h in request.headers]}
    if dns_name:
        return {"dns_name": dns_name}
    return None


# ---- text ----------------------------------------------------------------------------------

def _side_text(s: SideVerdict, local: Peer, remote: Peer) -> list[str]:
    title = f"{s.direction.capitalize()} of {local.name} {local.identity.display()}"
    if not s.evaluated:
        return [f"{title}: not a local endpoint, no policy enforced here"]
    d = s.decision
    lines = [f"{title}, {'from' if s.direction == 'ingress' else 'to'} {remote.name} "
             f"{remote.identity.display()}:"]
    if not d.enforced:
        lines.append("  no rule selects it for this direction: not enforced")
    elif d.drop_reason == "POLICY_DENY":
        lines += [f"  Found deny rule: {o.ref} {o.path}" for o in d.deciders]
    elif d.drop_reason == AUTH_REQUIRED:
        lines += [f"  Found allow rule requiring authentication (never given by l7gate): {o.ref} {o.path}"
                  for o in d.deciders]
    elif not d.allowed:
        lines.append("  Found no allow rule (default deny from: "
                     + ", ".join(f"{o.ref} {o.path}" for o in d.deciders) + ")")
    else:
        lines.append("  Found no deny rule")
        lines += [f"  Found allow rule: {o.ref} {o.path}" for o in d.deciders]
    if d.redirect and s.l7 is not None:
        x = s.l7
        lines.append(f"  Redirected to the {x.kind.upper()} proxy")
        if x.allow_all:
            lines.append("  an allow without L7 rules covers this peer: every request allowed")
        elif x.kind in UNCHECKED_L7:
            lines.append(f"  l7gate has no {x.kind.upper()} proxy: the port stays closed (fail closed)")
        for text, o in x.rules:
            mark = "matched" if o in x.matched else "rule"
            lines.append(f"    {mark}: {text} ({o.ref} {o.path})")
        if x.allowed is None:
            lines.append("  no request given (--http-* / --dns-name): each request is checked")
        else:
            lines.append(f"  L7 verdict: {'allowed' if x.allowed else 'denied'}")
    lines.append(f"  {s.direction.capitalize()} verdict: {'allowed' if s.allowed else 'denied'}")
    return lines


def to_text(v: FlowVerdict, request, dns_name) -> str:
    what = f"{v.port}/{v.proto}"
    if request is not None:
        what += f" {request.method} {request.path}"
    elif dns_name:
        what += f" DNS {dns_name}"
    lines = [f"Tracing From: {v.src.name} {v.src.identity.display()} => To: {v.dst.name} "
             f"{v.dst.identity.display()} {what}"]
    lines += _side_text(v.egress, v.src, v.dst)
    lines += _side_text(v.ingress, v.dst, v.src)
    direction, layer = _denied_at(v)
    if v.allowed:
        lines.append("Final verdict: ALLOWED")
    else:
        lines.append(f"Final verdict: DENIED ({layer}, {direction})")
    return "\n".join(lines) + "\n"

