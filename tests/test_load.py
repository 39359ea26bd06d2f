"""Loading (proxy.policy.source + schema + load): files -> documents -> layers -> api.Policy.

Data: the Cilium corpus (../shared/corpus/cilium-examples), tests/data/invalid (one case per file;
its `# expect: <layer> <path>: <message part>` lines say which errors it must produce) and
tests/data/valid (edge cases every layer accepts). Inputs too big or too odd to keep as files
(20 MB, binary, deep nesting) are made in tmp_path.
"""
from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import pytest

from proxy.policy import api, source
from proxy.policy.errors import LAYER_AGENT, LAYER_SCHEMA, LAYER_YAML
from proxy.policy.load import load_paths, load_text
from proxy.policy.sanitize import AgentOptions

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT.parent / "shared" / "corpus" / "cilium-examples"
DATA = ROOT / "tests" / "data"
INVALID = DATA / "invalid"
VALID = DATA / "valid"
POLICY_KINDS = {"CiliumNetworkPolicy", "CiliumClusterwideNetworkPolicy", "NetworkPolicy"}

# Corpus documents Cilium 1.19 itself rejects, and why. The first two use fields the 1.19 CRD does
# not have (kubectl's strict validation refuses them); the last two need agent flags that are off
# by default (the examples were written for clusters that turn them on).
CORPUS_REJECTED = {
    "policies/auth/auth.yaml": (LAYER_SCHEMA, 'unknown field "auth"', None),
    "policies/l3/requires/requires.yaml": (LAYER_SCHEMA, "fromRequires was removed in Cilium 1.19", None),
    "policies/host/allow-extended-protocols.yaml": (LAYER_AGENT, "port must be specified",
                                                    "enable_extended_ip_protocols"),
    "policies/l3/entities/customnodes.yaml": (LAYER_AGENT, '"enable-node-selector-labels" flag',
                                              "enable_node_selector_labels"),
}
ALL_FLAGS = AgentOptions(enable_node_selector_labels=True, enable_extended_ip_protocols=True)


def corpus_files() -> list[str]:
    files = source.list_files(str(CORPUS))
    assert len(files) >= 60, f"corpus not found under {CORPUS}"
    return files


def rel(f: str) -> str:
    return os.path.relpath(f, CORPUS)


def expectations(path: Path) -> list[tuple[str, str, str]]:
    out = []
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("# expect: "):
            layer, rest = line[len("# expect: "):].split(" ", 1)
            where, message = rest.split(": ", 1)
            out.append((layer, where, message))
    return out


def where(text: str, needle: str, nth: int = 0) -> tuple[int, int]:
    """1-based (line, column) of the nth occurrence of `needle` in `text` (comments skipped)."""
    idx = -1
    for _ in range(nth + 1):
        idx = text.index(needle, idx + 1)
        while text[text.rfind("\n", 0, idx) + 1:].startswith("#"):
            idx = text.index(needle, idx + 1)
    line = text.count("\n", 0, idx) + 1
    return line, idx - (text.rfind("\n", 0, idx) + 1) + 1


# --- the corpus ----------------------------------------------------------------------------------

@pytest.mark.parametrize("f", corpus_files(), ids=rel)
def test_corpus_file_loads_policies_valid_and_other_kinds_skipped(f):
    result = load_paths([f])
    assert result.documents, "every corpus file holds at least one object"
    for d in result.documents:
        if d.kind in POLICY_KINDS:
            assert d.skipped is None
            if rel(f) in CORPUS_REJECTED:
                layer, message, _ = CORPUS_REJECTED[rel(f)]
                assert [(e.layer, message in e.message) for e in d.errors] == [(layer, True)], d.errors
            else:
                assert d.valid, [str(e) for e in d.errors]
                assert d.policy is not None and d.policy.rules
        else:
            assert d.valid and d.policy is None
            assert d.skipped and d.kind in d.skipped and "not a network policy" in d.skipped


@pytest.mark.parametrize("name", [k for k, v in CORPUS_REJECTED.items() if v[2]])
def test_corpus_flag_dependent_examples_load_with_their_flags(name):
    result = load_paths([str(CORPUS / name)], ALL_FLAGS)
    assert result.valid, [str(e) for e in result.errors]
    assert len(result.policies) == 1


def test_corpus_as_one_directory_counts():
    result = load_paths([str(CORPUS)])
    policies = [d for d in result.documents if d.kind in POLICY_KINDS]
    assert len(policies) == 64
    assert sum(1 for d in result.documents if d.skipped) == 18
    assert sorted({os.path.relpath(d.file, CORPUS) for d in result.documents if not d.valid}) \
        == sorted(CORPUS_REJECTED)


# --- fixtures ------------------------------------------------------------------------------------

INVALID_FILES = sorted(INVALID.rglob("*.yaml"))
VALID_FILES = sorted(p for p in VALID.rglob("*") if p.suffix in (".yaml", ".yml", ".json"))


def test_fixture_counts():
    schema_cases = [p for p in INVALID_FILES if any(e[0] == LAYER_SCHEMA for e in expectations(p))]
    assert len(schema_cases) >= 40
    assert all(expectations(p) for p in INVALID_FILES), "every invalid fixture says what it expects"


@pytest.mark.parametrize("path", INVALID_FILES, ids=lambda p: str(p.relative_to(INVALID)))
def test_invalid_fixture_is_rejected_as_expected(path):
    result = load_paths([str(path)])
    assert not result.valid
    assert all(d.policy is None for d in result.documents if not d.valid), \
        "an invalid object contributes no policy"
    got = [(e.layer, e.path, e.message) for e in result.errors]
    for layer, at, part in expectations(path):
        assert any(g[0] == layer and g[1] == at and part in g[2] for g in got), \
            f"expected {layer} {at}: ...{part}...\ngot: {got}"
    for e in result.errors:
        assert e.file == str(path) and e.line >= 1 and e.column >= 1, e


@pytest.mark.parametrize("path", VALID_FILES, ids=lambda p: p.name)
def test_valid_fixture_loads_at_every_layer(path):
    result = load_paths([str(path)])
    assert result.valid, [str(e) for e in result.errors]
    assert result.policies


# --- positions -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name,needle,nth", [
    ("port-protocol-lowercase.yaml", "protocol: tcp", 0),
    ("port-unquoted-integer.yaml", "port: 80", 0),
    ("fqdn-double-dot.yaml", "matchName: a..example.com", 0),
    ("rule-unknown-field-typo.yaml", "ingres:", 0),
    ("object-top-level-description.yaml", "description:", 0),
    ("server-names-duplicate.yaml", "- example.com", 1),
    ("icmp-type-missing.yaml", "- family: IPv6", 0),
    ("knp-podselector-typo.yaml", "PodSelector:", 0),
])
def test_error_points_at_the_key_or_item(name, needle, nth):
    """Each fixture's first `# expect:` error is reported at the key (or list item) it names."""
    path = INVALID / name
    text = path.read_text()
    layer, at, _ = expectations(path)[0]
    error = next(e for e in load_paths([str(path)]).errors if (e.layer, e.path) == (layer, at))
    line, col = where(text, needle, nth)
    if needle.startswith("- "):
        col += 2  # a list item's position is its content, after the dash
    assert (error.line, error.column) == (line, col), str(error)


def test_api_objects_carry_their_positions():
    path = VALID / "cnp-every-field.yaml"
    text = path.read_text()
    (policy,) = load_paths([str(path)]).policies
    rule = policy.rules[0]
    assert policy.pos == where(text, "apiVersion")
    assert rule.pos == where(text, "spec:")
    assert rule.endpoint_selector.pos == where(text, "endpointSelector:")
    assert rule.ingress[0].pos == where(text, "fromEndpoints:")
    assert rule.ingress[0].to_ports[0].ports[0].pos == where(text, 'port: "8000"')
    assert rule.ingress[0].to_ports[0].rules.http[0].pos == where(text, "method: GET")
    assert rule.egress[1].fqdns[0].pos == where(text, "matchName: payments.example.com", 1)
    assert rule.egress[2].services[1].pos == where(text, "k8sServiceSelector:")


# --- the api form -----------------------------------------------------------------------------------

def test_every_field_lands_in_the_api_form():
    (p,) = load_paths([str(VALID / "cnp-every-field.yaml")]).policies
    assert p.ref == api.PolicyRef("CiliumNetworkPolicy", "shop", "shop-api",
                                  str(VALID / "cnp-every-field.yaml"))
    (r,) = p.rules
    assert r.endpoint_selector.match_labels == {"app": "api"}
    assert r.endpoint_selector.match_expressions == [
        api.Requirement("tier", "In", ["backend", "api"]), api.Requirement("canary", "DoesNotExist", [])]
    assert r.enable_default_deny == api.DefaultDeny(ingress=True, egress=False)
    assert r.labels == [api.RuleLabel("team", "a", "unspec")]
    assert r.log == "shop-api: default deny applies!"
    assert r.description.startswith("API:")
    assert [(e.direction, e.deny) for e in r.ingress] == [("ingress", False)] * 2
    assert [(e.direction, e.deny) for e in r.ingress_deny] == [("ingress", True)]
    assert [(e.direction, e.deny) for e in r.egress] == [("egress", False)] * 4
    assert [(e.direction, e.deny) for e in r.egress_deny] == [("egress", True)]
    http = r.ingress[0].to_ports[0].rules.http[0]
    assert (http.method, http.path, http.host, http.headers) == \
        ("GET", "/items/[0-9]+", "api.shop.example", ["X-Request-Id"])
    assert http.header_matches == [api.HeaderMatch("X-Token", "abc", None, "LOG"),
                                   api.HeaderMatch("X-Secret", "", {"namespace": "shop", "name": "token"}, "")]
    assert r.ingress[1].cidr_set[0].cidr == "10.0.0.0/8"
    assert r.ingress[1].cidr_set[0].except_ == ["10.96.0.0/12"]
    assert r.ingress_deny[0].entities == ["world"]
    dns = r.egress[0].to_ports[0].rules.dns
    assert [(d.match_name, d.match_pattern) for d in dns] == [(None, "*.shop.example"),
                                                               ("payments.example.com", None)]
    assert r.egress[1].fqdns[0].match_name == "payments.example.com"
    svc = r.egress[2].services
    assert svc[0].k8s_service == api.K8sServiceNamespace("db", "shop")
    assert svc[1].k8s_service_selector.selector.match_labels == {"app": "cache"}
    assert r.egress[3].authentication == {"mode": "required"}
    assert r.egress_deny[0].cidr == ["169.254.169.254/32"]
    assert r.egress[0].endpoints[0].match_labels == {
        "k8s:io.kubernetes.pod.namespace": "kube-system", "k8s:k8s-app": "kube-dns"}


def test_absent_list_is_none_and_written_empty_list_is_empty():
    text = ("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: x}\n"
            "spec:\n  endpointSelector: {}\n  ingress:\n  - fromEndpoints: []\n    toPorts: []\n  - {}\n")
    (p,) = load_text(text).policies
    first, second = p.rules[0].ingress
    assert first.endpoints == [] and first.to_ports == []
    assert second.endpoints is None and second.to_ports is None and second.cidr is None


def test_icmp_and_port_values_are_normalised_for_the_api():
    (icmp,) = load_paths([str(VALID / "icmp-edges.yaml")]).policies
    fields = icmp.rules[0].egress[0].icmps[0].fields
    assert [(f.type, f.family) for f in fields] == [
        ("0", "IPv4"), ("255", "IPv4"), ("255", "IPv4"), ("EchoRequest", "IPv4"),
        ("ExtendedEchoRequest", "IPv4"), ("NeighborSolicitation", "IPv6"), ("128", "IPv6")]
    (ports,) = load_paths([str(VALID / "port-edges.yaml")]).policies
    pp = ports.rules[0].ingress[0].to_ports[0].ports
    assert [(p.port, p.protocol, p.end_port) for p in pp] == [
        ("0", "ANY", 0), ("65535", "", 0), ("http-alt", "TCP", 0), ("1", "UDP", 65535),
        ("8000", "SCTP", 8080)]
    assert all(isinstance(p.end_port, int) for p in pp)
    assert len(ports.rules[0].ingress[1].to_ports[0].ports) == 40


def test_spec_and_specs_are_all_collected_in_order():
    (p,) = load_paths([str(VALID / "spec-and-specs.yaml")]).policies
    assert [r.endpoint_selector.match_labels["role"] for r in p.rules] == ["a", "b", "c"]
    assert p.rules[2].ingress_deny[0].deny


def test_agent_errors_name_the_rule_they_come_from():
    text = ("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: x}\n"
            "spec:\n  endpointSelector: {}\n  ingress: [{}]\n"
            "specs:\n- endpointSelector: {}\n  ingress: [{}]\n"
            "- nodeSelector: {}\n  ingress: [{}]\n")
    result = load_text(text)
    assert [(e.layer, e.path, e.line) for e in result.errors] == [(LAYER_AGENT, "specs[1].nodeSelector", 10)]
    assert result.policies == [], "one failing rule rejects the whole object"


def test_nulls_anchors_and_merge_keys():
    (p,) = load_paths([str(VALID / "nulls-and-anchors.yaml")]).policies
    r = p.rules[0]
    assert r.description == ""
    web, merged = r.ingress[0].endpoints
    assert web.match_labels == merged.match_labels == {"app": "web"}
    assert merged.match_expressions == [api.Requirement("env", "Exists", [])]
    assert r.egress[0].endpoints[0].match_labels == {"app": "api"}
    assert r.egress[0].to_ports[0].ports[0].port == "80"
    assert r.egress[0].icmps is None


@pytest.mark.parametrize("text,kind,namespace", [
    ("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: x}\n"
     "spec: {endpointSelector: {}, ingress: [{}]}\n", "CiliumNetworkPolicy", "default"),
    ("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: x, namespace: ops}\n"
     "spec: {endpointSelector: {}, ingress: [{}]}\n", "CiliumNetworkPolicy", "ops"),
    ("apiVersion: cilium.io/v2\nkind: CiliumClusterwideNetworkPolicy\nmetadata: {name: x, namespace: ops}\n"
     "spec: {endpointSelector: {}, ingress: [{}]}\n", "CiliumClusterwideNetworkPolicy", ""),
    ("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: x}\n"
     "spec: {podSelector: {}}\n", "NetworkPolicy", "default"),
], ids=["CNP without namespace gets default", "CNP keeps its namespace",
        "CCNP is cluster-scoped", "NetworkPolicy without namespace gets default"])
def test_namespace_defaulting(text, kind, namespace):
    result = load_text(text)
    (d,) = result.documents
    assert (d.kind, d.namespace, d.valid) == (kind, namespace, True)
    assert d.policy.ref.namespace == namespace


def test_network_policy_is_translated_after_validation():
    result = load_paths([str(VALID / "knp-full.yaml")])
    (p,) = result.policies
    assert p.ref == api.PolicyRef("NetworkPolicy", "sock-shop", "user-db", str(VALID / "knp-full.yaml"))
    assert p.rules and p.rules[0].ingress and p.rules[0].egress


def test_list_items_are_objects_of_their_own():
    result = load_paths([str(VALID / "list-of-policies.yaml")])
    assert [(d.kind, d.name, d.valid, bool(d.skipped)) for d in result.documents] == [
        ("CiliumNetworkPolicy", "listed-cnp", True, False),
        ("NetworkPolicy", "listed-knp", True, False),
        ("ConfigMap", "not-a-policy", True, True)]
    bad = ("apiVersion: v1\nkind: List\nitems:\n- apiVersion: cilium.io/v2\n  kind: CiliumNetworkPolicy\n"
           "  metadata: {name: a}\n  spec: {endpointSelector: {}, ingres: [{}]}\n")
    errors = load_text(bad).errors
    assert ("items[0].spec.ingres", 7) in [(e.path, e.line) for e in errors]


# --- documents, files, directories -------------------------------------------------------------------

def test_one_bad_document_does_not_stop_the_others():
    result = load_paths([str(INVALID / "malformed" / "one-bad-document-among-good.yaml")])
    assert [(d.name, d.valid) for d in result.documents] == [("first", True), ("", False), ("third", True)]
    assert [p.ref.name for p in result.policies] == ["first", "third"]
    assert result.documents[1].errors[0].layer == LAYER_YAML


def test_duplicate_key_is_an_error_and_the_rest_is_still_checked():
    text = ("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: x}\nspec:\n"
            "  endpointSelector: {}\n  ingress: [{}]\n  ingress: [{fromEntities: [World]}]\n")
    errors = load_text(text).errors
    assert [(e.layer, e.path, e.line, e.column) for e in errors] == [
        (LAYER_YAML, "spec.ingress", 7, 3), (LAYER_SCHEMA, "spec.ingress[0].fromEntities[0]", 7, 29)]


def test_too_large_file_is_refused_unread(tmp_path):
    big = tmp_path / "big.yaml"
    with open(big, "wb") as f:
        f.truncate(20 * 1024 * 1024)
    start = time.monotonic()
    (d,) = load_paths([str(big)]).documents
    assert time.monotonic() - start < 1
    assert d.errors[0].layer == LAYER_YAML and "file is too large" in d.errors[0].message


def test_a_fifo_or_device_named_like_a_policy_is_refused_without_waiting(tmp_path):
    """Opening a FIFO for reading waits for a writer: the agent's loop would hang for ever."""
    os.mkfifo(tmp_path / "pipe.yaml")
    (tmp_path / "zero.yaml").symlink_to("/dev/zero")
    signal.signal(signal.SIGALRM, lambda *_: pytest.fail("reading the FIFO blocked"))
    signal.alarm(5)
    try:
        docs = load_paths([str(tmp_path)]).documents
    finally:
        signal.alarm(0)
    assert [(Path(d.file).name, d.errors[0].message) for d in docs] == \
        [("pipe.yaml", "not a regular file"), ("zero.yaml", "not a regular file")]


def test_a_pipe_named_explicitly_is_read_as_it_comes(tmp_path):
    """`l7gate policy validate <(...)`: a file named on the command line may be a pipe."""
    import threading
    pipe = tmp_path / "pipe.yaml"
    os.mkfifo(pipe)
    text = (INVALID.parent / "valid" / "server-names.yaml").read_text()
    writer = threading.Thread(target=lambda: pipe.write_text(text))
    writer.start()
    docs = load_paths([str(pipe)]).documents
    writer.join()
    assert docs and all(not d.errors for d in docs)
    (refused,) = load_paths([str(pipe)], regular_only=True).documents  # as the agent reads
    assert refused.errors[0].message == "not a regular file"


def test_alias_bomb_is_bounded():
    start = time.monotonic()
    (d,) = load_paths([str(INVALID / "malformed" / "alias-bomb.yaml")]).documents
    assert time.monotonic() - start < 5
    assert "expands to more than" in d.errors[0].message


@pytest.mark.parametrize("opening,closing", [("[", "]"), ("{a: ", "}"), ("- ", "")],
                         ids=["flow sequences", "flow mappings", "block sequences"])
def test_deep_nesting_is_refused_quickly(tmp_path, opening, closing):
    deep = tmp_path / "deep.yaml"
    n = 200_000 if opening != "- " else 1_000
    if opening == "- ":
        deep.write_text("".join(" " * i + "-\n" for i in range(n)))
    else:
        deep.write_text(opening * n + closing * n)
    start = time.monotonic()
    (d,) = load_paths([str(deep)]).documents
    assert time.monotonic() - start < 5
    assert "deeper than" in d.errors[0].message


@pytest.mark.parametrize("data,message", [
    (bytes(range(256)) * 8, "not a text file: invalid UTF-8"),
    (b"kind: \x00\x01\x02 policy", "character '\\x00' is not allowed in YAML"),
], ids=["random bytes", "control characters"])
def test_binary_garbage_is_an_error(tmp_path, data, message):
    f = tmp_path / "garbage.yaml"
    f.write_bytes(data)
    (d,) = load_paths([str(f)]).documents
    assert not d.valid and message in d.errors[0].message


def test_documents_per_file_are_bounded(tmp_path):
    f = tmp_path / "many.yaml"
    f.write_text("---\nkind: Pod\napiVersion: v1\n" * (source.MAX_DOCUMENTS + 50))
    start = time.monotonic()
    docs = load_paths([str(f)]).documents
    assert time.monotonic() - start < 10
    assert len(docs) == source.MAX_DOCUMENTS + 1
    assert "more than 10000 documents" in docs[-1].errors[0].message
    assert docs[-1].errors[0].line == 3 * source.MAX_DOCUMENTS + 1


POLICY = ("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: enc\n"
          "spec:\n  endpointSelector: {}\n  ingress:\n  - {}\n")


@pytest.mark.parametrize("data", [
    POLICY.encode("utf-8-sig"), POLICY.replace("\n", "\r\n").encode(), POLICY.encode("utf-16"),
], ids=["utf-8 with BOM", "CRLF line ends", "utf-16 with BOM"])
def test_encodings_and_line_ends(tmp_path, data):
    f = tmp_path / "enc.yaml"
    f.write_bytes(data)
    result = load_paths([str(f)])
    assert result.valid and result.policies[0].rules[0].ingress[0].pos == (8, 5)


@pytest.mark.parametrize("text", ["", "# only a comment\n", "---\n---\n"],
                         ids=["empty", "comments only", "only document markers"])
def test_a_file_without_documents_loads_as_no_policy(tmp_path, text):
    f = tmp_path / "none.yaml"
    f.write_text(text)
    (d,) = load_paths([str(f)]).documents
    assert d.empty and d.valid and d.policy is None


def test_directories_are_walked_recursively_sorted_and_filtered(tmp_path):
    """*.yaml, *.yml, *.json at any depth, sorted, hidden names skipped, paths as joined."""
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "deep").mkdir(parents=True)
    (tmp_path / ".git").mkdir()
    for name in ("b/z.yaml", "a/deep/y.yml", "a/x.json", "c.yaml", "notes.txt", "a/README.md",
                 ".git/config.yaml", "a/.#c.yaml"):
        (tmp_path / name).write_text(POLICY.replace("name: enc", f"name: {Path(name).stem}")
                                     if not name.endswith(".json") else
                                     '{"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}}')
    arg = str(tmp_path) + "/"
    files = [d.file for d in load_paths([arg]).documents]
    assert files == [os.path.join(arg, p) for p in ("a/deep/y.yml", "a/x.json", "b/z.yaml", "c.yaml")]
    assert load_paths([str(tmp_path / "empty-dir-does-not-exist")]).errors[0].message.startswith(
        "cannot read file")
    (tmp_path / "empty").mkdir()
    assert load_paths([str(tmp_path / "empty")]).documents == []


@pytest.mark.parametrize("path,text", [
    (("spec", "ingress", 0, "toPorts"), "spec.ingress[0].toPorts"),
    (("spec", "endpointSelector", "matchLabels", "k8s:io.kubernetes.pod.namespace"),
     "spec.endpointSelector.matchLabels[k8s:io.kubernetes.pod.namespace]"),
    ((0, "a"), "[0].a"),
    ((), ""),
])
def test_format_path(path, text):
    assert source.format_path(path) == text


def test_yaml_scalars_resolve_as_kubernetes_does():
    (d,) = source.parse_text("a: 2025-01-01T10:00:00Z\nb: on\nc: 0x10\nd: '80'\ne: 1.0\nf: ~\n")
    assert d.value == {"a": "2025-01-01T10:00:00Z", "b": True, "c": 16, "d": "80", "e": 1.0, "f": None}
    assert re.fullmatch(r"\(\d+, \d+\)", str(d.pos_of(("x", "y"))))
