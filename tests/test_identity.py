"""Identities (spec §12) and endpoint labels (spec §4.1)."""
import pytest

from proxy.policy.endpoint import Endpoint
from proxy.policy.identity import CLUSTER_MAX, CLUSTER_MIN, LOCAL_MIN, IdentityAllocator, relevant
from proxy.policy.labels import Label, LabelSet, parse_label


def test_same_labels_same_identity_across_allocators():
    a, b = IdentityAllocator(), IdentityAllocator()
    ep = Endpoint("x", labels={"app": "web"})
    b.for_labels(Endpoint("y", labels={"app": "other"}).label_set())
    assert a.for_labels(ep.label_set()).id == b.for_labels(ep.label_set()).id


def test_cluster_identities_in_range_and_distinct():
    alloc = IdentityAllocator()
    ids = {alloc.for_labels(Endpoint(f"e{i}", labels={"i": str(i)}).label_set()).id for i in range(3000)}
    assert len(ids) == 3000
    assert all(CLUSTER_MIN <= i <= CLUSTER_MAX for i in ids)


def test_irrelevant_labels_do_not_split_identities():
    alloc = IdentityAllocator()
    a = Endpoint("a", labels={"app": "web", "pod-template-hash": "abc"})
    b = Endpoint("b", labels={"app": "web", "pod-template-hash": "def"})
    assert alloc.for_labels(a.label_set()).id == alloc.for_labels(b.label_set()).id


@pytest.mark.parametrize("key,expected", [
    ("io.kubernetes.pod.namespace", True), ("io.kubernetes.pod.name", False),
    ("app.kubernetes.io/name", True), ("kubernetes.io/hostname", False),
    ("io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name", True),
    ("controller-revision-hash", False), ("org", True),
])
def test_relevance_filter(key, expected):
    assert relevant(Label("k8s", key, "v")) is expected


def test_reserved_label_set_gets_reserved_number():
    alloc = IdentityAllocator()
    assert alloc.for_labels(LabelSet.of([Label("reserved", "host")])).id == 1
    assert alloc.for_labels(LabelSet.of([Label("reserved", "init")])).id == 5


def test_local_identity_is_node_local_and_stable_per_label_set():
    alloc = IdentityAllocator()
    labels = LabelSet.of([Label("reserved", "world"), Label("cidr", "192.0.2.0/24")])
    ident = alloc.for_local(labels)
    assert ident.id >= LOCAL_MIN
    assert alloc.for_local(LabelSet.of(list(labels))).id == ident.id
    assert [str(n) for n in ident.nets] == ["192.0.2.0/24"]
    assert alloc.for_local(LabelSet.of([Label("reserved", "world")])).id == 2


def test_endpoint_derives_cilium_labels():
    ep = Endpoint("deathstar", namespace="empire", labels={"org": "empire", "container:x": "y"},
                  namespace_labels={"team": "dark"}, service_account="ds")
    got = set(ep.label_set().strings())
    assert {"k8s:org=empire", "container:x=y", "k8s:io.kubernetes.pod.namespace=empire",
            "k8s:io.cilium.k8s.policy.serviceaccount=ds", "k8s:io.cilium.k8s.policy.cluster=default",
            "k8s:io.cilium.k8s.namespace.labels.team=dark",
            "k8s:io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name=empire"} <= got


@pytest.mark.parametrize("text,label", [
    ("app=web", Label("k8s", "app", "web")),
    ("k8s:app=web", Label("k8s", "app", "web")),
    ("container:app=web", Label("container", "app", "web")),
    ("reserved:host", Label("reserved", "host", "")),
    ("$host", Label("reserved", "host", "")),
])
def test_parse_label(text, label):
    assert parse_label(text) == label
