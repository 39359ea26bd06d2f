"""Labels with sources (spec §4.1) and the label sets identities are made of.

A label is `source:key=value`. Selectors may use the wildcard source `any`; endpoints never carry
it. `LabelSet` precomputes the views selector matching needs, so a match is a few set operations.
"""
from __future__ import annotations

from dataclasses import dataclass, field

ANY = "any"
K8S = "k8s"
RESERVED = "reserved"
CONTAINER = "container"
CIDR = "cidr"
FQDN = "fqdn"
UNSPEC = "unspec"
NODE = "node"

# Implicit Kubernetes label keys (spec §4.1, §4.4).
POD_NAMESPACE = "io.kubernetes.pod.namespace"
NAMESPACE_LABELS = "io.cilium.k8s.namespace.labels."
SERVICE_ACCOUNT = "io.cilium.k8s.policy.serviceaccount"
CLUSTER = "io.cilium.k8s.policy.cluster"
DEFAULT_CLUSTER = "default"


@dataclass(frozen=True, order=True)
class Label:
    source: str
    key: str
    value: str = ""

    def __str__(self) -> str:
        return f"{self.source}:{self.key}={self.value}" if self.value else f"{self.source}:{self.key}"


def split_key(key: str, default_source: str) -> tuple[str, str]:
    """`src:key` -> (src, key); `$host` and `reserved.x` are reserved; else `default_source`."""
    if key.startswith("$"):
        return RESERVED, key[1:]
    if ":" in key:
        source, _, rest = key.partition(":")
        return source, rest
    if key.startswith("reserved."):
        return RESERVED, key[len("reserved."):]
    return default_source, key


def parse_label(text: str, default_source: str = K8S) -> Label:
    """`[source:]key[=value]` as written on a command line or in an endpoints file."""
    key, _, value = text.partition("=")
    source, key = split_key(key.strip(), default_source)
    return Label(source, key, value.strip())


@dataclass(frozen=True)
class LabelSet:
    """An immutable set of labels with the indexes selector matching uses."""
    labels: frozenset[Label]
    by_key: dict[str, dict[str, str]] = field(compare=False, hash=False, repr=False)
    kv: frozenset[tuple[str, str]] = field(compare=False, hash=False, repr=False)
    skv: frozenset[tuple[str, str, str]] = field(compare=False, hash=False, repr=False)

    @classmethod
    def of(cls, labels) -> "LabelSet":
        labels = frozenset(labels)
        by_key: dict[str, dict[str, str]] = {}
        for lb in labels:
            by_key.setdefault(lb.key, {})[lb.source] = lb.value
        return cls(labels, by_key,
                   frozenset((lb.key, lb.value) for lb in labels),
                   frozenset((lb.source, lb.key, lb.value) for lb in labels))

    def has_source(self, source: str) -> bool:
        return any(lb.source == source for lb in self.labels)

    def get(self, source: str, key: str) -> str | None:
        return self.by_key.get(key, {}).get(source)

    def sorted(self) -> list[Label]:
        return sorted(self.labels)

    def strings(self) -> list[str]:
        return [str(lb) for lb in self.sorted()]

    def __iter__(self):
        return iter(self.labels)

    def __len__(self) -> int:
        return len(self.labels)
