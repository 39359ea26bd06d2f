"""Security identities (spec §12): reserved numbers, allocated numbers stable per label set.

An identity is the set of identity-relevant labels; endpoints with the same relevant labels share
it. An address outside every endpoint gets a node-local identity made of labels too (spec §12):
`reserved:world`, `cidr:<prefix>` for every prefix the policies name that contains it, and
`fqdn:<selector>` for every toFQDNs selector matching a name the FQDN cache holds for it. So all
addresses that policy cannot tell apart share one identity, and a newly learned IP usually lands
in an identity the datapath already has.
"""
from __future__ import annotations

import hashlib
import ipaddress
import re
from dataclasses import dataclass, field
from typing import Callable

from proxy.policy.labels import CIDR, RESERVED, Label, LabelSet

RESERVED_IDS = {
    "host": 1, "world": 2, "unmanaged": 3, "health": 4, "init": 5, "remote-node": 6,
    "kube-apiserver": 7, "ingress": 8, "world-ipv4": 9, "world-ipv6": 10,
}
RESERVED_NAMES = {v: k for k, v in RESERVED_IDS.items()}
CLUSTER_MIN, CLUSTER_MAX = 256, 65535
LOCAL_MIN, LOCAL_MAX = 0x01000001, 0x01FFFFFF

# Labels that do not make an identity (spec §12 default filter); reserved labels always count.
_IRRELEVANT = re.compile(
    r"^(io\.kubernetes(?!\.pod\.namespace$)|kubernetes\.io|statefulset\.kubernetes\.io/pod-name$"
    r"|apps\.kubernetes\.io/pod-index$|batch\.kubernetes\.io/job-completion-index$"
    r"|batch\.kubernetes\.io/controller-uid$|.*beta\.kubernetes\.io|k8s\.io"
    r"|pod-template-generation$|pod-template-hash$|controller-revision-hash$|controller-uid$"
    r"|annotation|etcd_node$)")


def labels_key(labels) -> str:
    """The canonical text of a label set: what an identity number is claimed for."""
    return "\n".join(sorted(map(str, labels)))


def relevant(label: Label) -> bool:
    if label.source == RESERVED:
        return True
    key = label.key
    if key.startswith(("io.cilium.k8s.namespace.labels.", "app.kubernetes.io")):
        return True
    return not _IRRELEVANT.match(key)


IPNet = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class Identity:
    id: int
    labels: LabelSet
    nets: tuple[IPNet, ...] = field(default=(), compare=False)  # its `cidr:` labels, parsed

    @property
    def reserved_name(self) -> str | None:
        return RESERVED_NAMES.get(self.id)

    def display(self) -> str:
        """Hubble's form: `(world)` for reserved, `(ID:N)` otherwise."""
        name = self.reserved_name
        return f"({name})" if name else f"(ID:{self.id})"


def reserved(name: str) -> Identity:
    labels = [Label(RESERVED, name)]
    return Identity(RESERVED_IDS[name], LabelSet.of(labels))


class IdentityAllocator:
    """Hands out numbers: the same label set always gets the same number.

    Cluster identities come from a hash of the labels (probing on collision), so two processes
    that see the same endpoints agree without talking; the agent's registry makes it collision-free
    across processes later. IP-derived identities get node-local numbers (scope bit 24).
    """

    def __init__(self, reserve: Callable[[int, str], bool] | None = None) -> None:
        # `reserve(number, labels_key)` claims a number for a label set somewhere shared (the
        # agent's registry) and says whether it is ours; without it numbers are only local.
        self._reserve = reserve
        self._by_labels: dict[frozenset[Label], Identity] = {}
        self._used: set[int] = set()
        self._next_local = LOCAL_MIN

    def for_labels(self, labels: LabelSet) -> Identity:
        relevant_set = frozenset(lb for lb in labels if relevant(lb))
        found = self._by_labels.get(relevant_set)
        if found:
            return found
        reserved_only = [lb for lb in relevant_set if lb.source == RESERVED]
        if len(relevant_set) == 1 and reserved_only and reserved_only[0].key in RESERVED_IDS:
            num = RESERVED_IDS[reserved_only[0].key]
        else:
            num = self._hash_number(relevant_set)
        ident = Identity(num, LabelSet.of(relevant_set))
        self._by_labels[relevant_set] = ident
        self._used.add(num)
        return ident

    def _hash_number(self, labels: frozenset[Label]) -> int:
        key = labels_key(labels)
        digest = hashlib.sha256(key.encode()).digest()
        span = CLUSTER_MAX - CLUSTER_MIN + 1
        num = CLUSTER_MIN + int.from_bytes(digest[:8], "big") % span
        for _ in range(span):
            if num not in self._used and (self._reserve is None or self._reserve(num, key)):
                return num
            num = CLUSTER_MIN + (num - CLUSTER_MIN + 1) % span
        raise RuntimeError("no free cluster identity")

    def for_local(self, labels: LabelSet) -> Identity:
        """A node-local identity (CIDR/FQDN-derived) for this label set, stable while we run."""
        key = frozenset(labels)
        found = self._by_labels.get(key)
        if found:
            return found
        if key == frozenset([Label(RESERVED, "world")]):
            ident = reserved("world")
        else:
            nets = tuple(ipaddress.ip_network(lb.key) for lb in key if lb.source == CIDR)
            ident = Identity(self._next_local, labels, nets)
            self._next_local += 1
        self._by_labels[key] = ident
        return ident
