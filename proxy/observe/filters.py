"""`hubble observe`-style flow filters, as one serialisable object (the relay sends it to agents).

Semantics follow the hubble CLI: different filter kinds must all match (AND); several values of one
kind are alternatives (OR).
  --pod [NS/]NAME       source or destination pod; NAME is a prefix (`deathstar` matches
                        `deathstar-7848d6c4d5-th9v2`), NS defaults to `default`, `NS/` = the namespace
  --from-pod, --to-pod  the same on the source / destination only (a reply's source is the server)
  --namespace NS        source or destination namespace
  --verdict V           FORWARDED, DROPPED, ERROR, AUDIT, REDIRECTED, ...
  --protocol P          http, dns (L7 records) or tcp, udp, sctp, icmp, icmpv4, icmpv6 (L4 header;
                        an HTTP flow is also a tcp flow)
  --label SEL           source or destination labels: `k=v`, `k!=v`, `k`, `!k`, comma = AND;
                        a key may carry a source (`k8s:app=x`), otherwise any source matches
  --type T              l7, drop, trace, policy-verdict
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from proxy.observe.flow import EVENT_DROP, EVENT_L7, EVENT_POLICY_VERDICT, EVENT_TRACE

TYPES = {"l7": EVENT_L7, "drop": EVENT_DROP, "trace": EVENT_TRACE, "policy-verdict": EVENT_POLICY_VERDICT}
L4_PROTOCOLS = {"tcp": ("TCP",), "udp": ("UDP",), "sctp": ("SCTP",), "icmp": ("ICMPv4", "ICMPv6"),
                "icmpv4": ("ICMPv4",), "icmpv6": ("ICMPv6",)}
L7_PROTOCOLS = {"http": "http", "dns": "dns", "kafka": "kafka"}


class FilterError(ValueError):
    pass


def _pod_prefix(text: str) -> str:
    text = text.strip()
    if not text:
        raise FilterError("empty pod name")
    return text if "/" in text else f"default/{text}"


def _pod_matches(endpoint: dict, prefix: str) -> bool:
    pod = endpoint.get("pod_name", "")
    ns = endpoint.get("namespace", "")
    if prefix.endswith("/"):
        return bool(ns) and f"{ns}/" == prefix
    return bool(pod) and f"{ns}/{pod}".startswith(prefix)


def _split_label(text: str) -> tuple[str | None, str, str | None]:
    """`[source:]key[=value]` -> (source or None, key, value or None)."""
    key, eq, value = text.partition("=")
    source = None
    if ":" in key:
        source, key = key.split(":", 1)
    return source, key.strip(), value.strip() if eq else None


def parse_selector(text: str) -> list[tuple[str, str | None, str, str | None]]:
    """`k=v,k2!=v2,k3,!k4` -> [(op, source, key, value)] with op in =, !=, exists, !exists."""
    reqs = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        if "!=" in part:
            k, v = part.split("!=", 1)
            source, key, _ = _split_label(k)
            reqs.append(("!=", source, key, v.strip()))
        elif part.startswith("!"):
            source, key, _ = _split_label(part[1:])
            reqs.append(("!exists", source, key, None))
        else:
            source, key, value = _split_label(part.replace("==", "="))
            reqs.append(("=" if value is not None else "exists", source, key, value))
    if not reqs or any(not key for _, _, key, _ in reqs):
        raise FilterError(f"bad label selector {text!r}")
    return reqs


def _labels_match(labels: list[str], reqs) -> bool:
    parsed = [_split_label(lb) for lb in labels]

    def values(source, key):
        return [v if v is not None else "" for s, k, v in parsed
                if k == key and (source in (None, "any") or s == source)]

    for op, source, key, value in reqs:
        vs = values(source, key)
        if op == "=" and value not in vs:
            return False
        if op == "!=" and value in vs:
            return False
        if op == "exists" and not vs:
            return False
        if op == "!exists" and vs:
            return False
    return True


@dataclass
class FlowFilter:
    pods: list[str] = field(default_factory=list)
    from_pods: list[str] = field(default_factory=list)
    to_pods: list[str] = field(default_factory=list)
    namespaces: list[str] = field(default_factory=list)
    verdicts: list[str] = field(default_factory=list)
    protocols: list[str] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    types: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.pods = [_pod_prefix(p) for p in self.pods]
        self.from_pods = [_pod_prefix(p) for p in self.from_pods]
        self.to_pods = [_pod_prefix(p) for p in self.to_pods]
        self.verdicts = [v.strip().upper() for v in self.verdicts]
        self.protocols = [p.strip().lower() for p in self.protocols]
        for p in self.protocols:
            if p not in L4_PROTOCOLS and p not in L7_PROTOCOLS:
                raise FilterError(f"unknown protocol {p!r} (http, dns, tcp, udp, sctp, icmp, icmpv4, icmpv6)")
        self.types = [t.strip().lower() for t in self.types]
        for t in self.types:
            if t not in TYPES:
                raise FilterError(f"unknown type {t!r} ({', '.join(TYPES)})")
        self._selectors = [parse_selector(s) for s in self.labels]

    @classmethod
    def from_dict(cls, d: dict | None) -> "FlowFilter":
        d = d or {}
        known = {k: list(d.get(k) or []) for k in cls.__dataclass_fields__}
        unknown = set(d) - set(known)
        if unknown:
            raise FilterError(f"unknown filter fields: {', '.join(sorted(unknown))}")
        return cls(**known)

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v}

    @property
    def empty(self) -> bool:
        return not self.to_dict()

    def __call__(self, flow: dict) -> bool:
        src, dst = flow.get("source", {}), flow.get("destination", {})
        if self.pods and not any(_pod_matches(src, p) or _pod_matches(dst, p) for p in self.pods):
            return False
        if self.from_pods and not any(_pod_matches(src, p) for p in self.from_pods):
            return False
        if self.to_pods and not any(_pod_matches(dst, p) for p in self.to_pods):
            return False
        if self.namespaces and not (src.get("namespace") in self.namespaces
                                    or dst.get("namespace") in self.namespaces):
            return False
        if self.verdicts and flow.get("verdict") not in self.verdicts:
            return False
        if self.protocols and not any(self._protocol(flow, p) for p in self.protocols):
            return False
        if self.types and flow.get("event_type", {}).get("type") not in {TYPES[t] for t in self.types}:
            return False
        if self._selectors and not any(
                _labels_match(src.get("labels", []), sel) or _labels_match(dst.get("labels", []), sel)
                for sel in self._selectors):
            return False
        return True

    @staticmethod
    def _protocol(flow: dict, p: str) -> bool:
        if p in L7_PROTOCOLS:
            return L7_PROTOCOLS[p] in flow.get("l7", {})
        return any(name in flow.get("l4", {}) for name in L4_PROTOCOLS[p])
