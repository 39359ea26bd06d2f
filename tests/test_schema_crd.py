"""The schema layer agrees with Cilium's CRD.

For every CiliumNetworkPolicy / CiliumClusterwideNetworkPolicy document of the corpus
(../shared/corpus/cilium-examples) and of our fixtures (tests/data/invalid, tests/data/valid),
the verdict of `proxy.policy.schema` (any schema-layer error or none) must equal the verdict of
jsonschema over the CRD's openAPIV3Schema (../shared/crds), read here and only here.

To compare like with like, the CRD is given what the API server adds around it:
* kubectl's strict field validation: `additionalProperties: false` on every object schema that
  has `properties` and neither `additionalProperties` nor `x-kubernetes-preserve-unknown-fields`
  (only schemas with `type: object`: the `{properties: {x: {}}, required: [x]}` branches of
  oneOf/anyOf only test presence and must stay open);
* `x-kubernetes-int-or-string` as `anyOf: [integer, string]`, `x-kubernetes-list-type: set` as
  `uniqueItems`;
* `format: cidr` checked as Go's net.ParseCIDR does (jsonschema has no cidr format); formats
  Kubernetes does not check (idn-hostname, int32, int64) are not checked; date-time only occurs
  under `status` and is not checked;
* patterns searched with RE2, as Go's regexp.MatchString does (the CRD's `^\\PC*$` needs it);
* ObjectMeta, which the CRD leaves as `type: object`: the API server requires `name` (a DNS-1123
  subdomain), a DNS-1123 label as namespace, valid label keys/values, and is strict too;
* null values in mappings are dropped first (the API server prunes nulls of non-nullable fields).
"""
from __future__ import annotations

import ipaddress
import os
from pathlib import Path

import jsonschema
import pytest
import re2
import yaml
from jsonschema import validators

from proxy.policy import schema, source
from proxy.policy.errors import LAYER_SCHEMA

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
CRDS = {schema.KIND_CNP: SHARED / "crds" / "ciliumnetworkpolicies.yaml",
        schema.KIND_CCNP: SHARED / "crds" / "ciliumclusterwidenetworkpolicies.yaml"}
CORPUS = SHARED / "corpus" / "cilium-examples"
FIXTURES = [ROOT / "tests" / "data" / "invalid", ROOT / "tests" / "data" / "valid"]

DNS1123_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
DNS1123_SUBDOMAIN = rf"^{DNS1123_LABEL}(\.{DNS1123_LABEL})*$"
QUALIFIED_NAME = (rf"^({DNS1123_LABEL}(\.{DNS1123_LABEL})*/)?"
                  r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
LABEL_VALUE = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"

OBJECT_META = {
    "type": "object",
    "required": ["name"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "maxLength": 253, "pattern": DNS1123_SUBDOMAIN},
        "namespace": {"type": "string", "maxLength": 63, "pattern": f"^{DNS1123_LABEL}$"},
        "generateName": {"type": "string"},
        "labels": {"type": "object", "propertyNames": {"pattern": QUALIFIED_NAME},
                   "additionalProperties": {"type": "string", "maxLength": 63,
                                            "pattern": LABEL_VALUE}},
        "annotations": {"type": "object", "propertyNames": {"pattern": QUALIFIED_NAME},
                        "additionalProperties": {"type": "string"}},
        "uid": {"type": "string"}, "resourceVersion": {"type": "string"},
        "generation": {"type": "integer"}, "selfLink": {"type": "string"},
        "creationTimestamp": {"type": "string"}, "deletionTimestamp": {"type": "string"},
        "deletionGracePeriodSeconds": {"type": "integer"},
        "finalizers": {"type": "array", "items": {"type": "string"}},
        "ownerReferences": {"type": "array"}, "managedFields": {"type": "array"},
    },
}


# --- the reference validator ---------------------------------------------------------------------

def kube_strict(node):
    """The CRD schema as the API server + kubectl --validate=strict apply it (module docstring)."""
    if isinstance(node, list):
        return [kube_strict(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: kube_strict(v) for k, v in node.items()}
    if (out.get("type") == "object" and "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    if out.get("x-kubernetes-int-or-string") and "anyOf" not in out and "type" not in out:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if out.get("x-kubernetes-list-type") == "set":
        out["uniqueItems"] = True
    return out


def go_pattern(validator, pattern, instance, _schema):
    if isinstance(instance, str) and not re2.search(pattern, instance):
        yield jsonschema.ValidationError(f"{instance!r} does not match {pattern!r}")


KubeValidator = validators.extend(jsonschema.Draft7Validator, {"pattern": go_pattern})
FORMATS = jsonschema.FormatChecker(formats=())


@FORMATS.checks("cidr")
def go_parse_cidr(value) -> bool:
    if not isinstance(value, str):
        return True
    addr, slash, bits = value.partition("/")
    if not slash or not bits.isdigit() or "%" in addr:
        return False
    try:
        return int(bits) <= ipaddress.ip_address(addr).max_prefixlen
    except ValueError:
        return False


def crd_validator(kind: str):
    assert CRDS[kind].is_file(), f"missing CRD {CRDS[kind]} (../shared must sit next to the project)"
    crd = yaml.safe_load(CRDS[kind].read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v2"]
    root = kube_strict(version["schema"]["openAPIV3Schema"])
    root["properties"]["metadata"] = OBJECT_META
    return KubeValidator(root, format_checker=FORMATS)


VALIDATORS = {kind: crd_validator(kind) for kind in CRDS}


def prune_nulls(value):
    if isinstance(value, dict):
        return {k: prune_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [prune_nulls(v) for v in value]
    return value


# --- the documents ---------------------------------------------------------------------------------

def policy_documents() -> list:
    params = []
    files = source.list_files(str(CORPUS)) + [f for d in FIXTURES for f in source.list_files(str(d))]
    for f in files:
        for doc in source.read_file(f):
            v = doc.value
            if (doc.readable and isinstance(v, dict) and v.get("kind") in CRDS
                    and v.get("apiVersion") == "cilium.io/v2"):
                rel = os.path.relpath(f, ROOT.parent)  # a test id; ../shared may be a link
                params.append(pytest.param(doc, id=f"{rel}#{doc.index}"))
    return params


DOCUMENTS = policy_documents()


@pytest.mark.parametrize("doc", DOCUMENTS)
def test_schema_layer_verdict_equals_crd_verdict(doc):
    crd_errors = sorted(VALIDATORS[doc.value["kind"]].iter_errors(prune_nulls(doc.value)),
                        key=lambda e: list(map(str, e.absolute_path)))
    ours = [e for e in schema.check_object(doc.value, doc.pos_of, (), doc.file).errors
            if e.layer == LAYER_SCHEMA]
    crd_says = [f"{'.'.join(map(str, e.absolute_path))}: {e.message[:200]}" for e in crd_errors]
    we_say = [f"{e.path}: {e.message}" for e in ours]
    assert bool(crd_says) == bool(we_say), f"CRD: {crd_says}\nours: {we_say}"


def test_the_comparison_covers_corpus_and_fixtures():
    ids = [p.id for p in DOCUMENTS]
    corpus = [i for i in ids if i.startswith("shared/")]
    invalid = [p for p in DOCUMENTS if "/data/invalid/" in p.id
               and any(VALIDATORS[p.values[0].value["kind"]].iter_errors(prune_nulls(p.values[0].value)))]
    assert len(corpus) >= 60, corpus
    assert len(invalid) >= 40, f"only {len(invalid)} CRD-invalid fixtures"


# --- the reference itself must be able to say no ---------------------------------------------

BASE = {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy", "metadata": {"name": "x"},
        "spec": {"endpointSelector": {}, "ingress": [{}]}}


@pytest.mark.parametrize("name,patch,valid", [
    ("base policy is valid", {}, True),
    ("unknown field rejected (strict)", {"spec": {"endpointSelector": {}, "ingress": [{"fromEndpoint": []}]}}, False),
    ("lower-case protocol rejected", {"spec": {"endpointSelector": {}, "ingress": [
        {"toPorts": [{"ports": [{"port": "80", "protocol": "tcp"}]}]}]}}, False),
    ("bare IP is not a cidr", {"spec": {"endpointSelector": {}, "egress": [{"toCIDR": ["10.0.0.1"]}]}}, False),
    ("control character in log.value (RE2 \\PC)", {"spec": {"endpointSelector": {}, "ingress": [{}],
                                                            "log": {"value": "a\tb"}}}, False),
    ("missing metadata.name", {"metadata": {}}, False),
    ("duplicate serverNames (list-type set)", {"spec": {"endpointSelector": {}, "egress": [
        {"toPorts": [{"ports": [{"port": "443"}], "serverNames": ["a.com", "a.com"]}]}]}}, False),
    ("integer ICMP type passes int-or-string", {"spec": {"endpointSelector": {}, "egress": [
        {"icmps": [{"fields": [{"type": 8}]}]}]}}, True),
])
def test_reference_validator_is_strict(name, patch, valid):
    doc = {**BASE, **patch}
    errors = list(VALIDATORS[schema.KIND_CNP].iter_errors(doc))
    assert (not errors) == valid, errors


# --- the tables themselves, field by field ------------------------------------------------------

def mirror_differences(crd: dict, ours, path: str) -> list[str]:
    """Where our table says something else than the CRD node (type, fields, required, oneOf,
    anyOf, enum, pattern, lengths, item counts, bounds, list-type set, format cidr)."""
    def branches(alternatives):
        return tuple(b["required"][0] for b in alternatives)

    kind = crd.get("type")
    if crd.get("x-kubernetes-int-or-string"):
        ok = isinstance(ours, schema.IntOrStr) and crd.get("pattern", "") == ours.pattern
        return [] if ok else [f"{path}: int-or-string"]
    if kind == "object" and "properties" in crd:
        if not isinstance(ours, schema.Obj):
            return [f"{path}: object with fields"]
        diffs = []
        if set(crd["properties"]) != set(ours.fields):
            diffs.append(f"{path}: fields differ by {set(crd['properties']) ^ set(ours.fields)}")
        if sorted(crd.get("required", [])) != sorted(ours.required):
            diffs.append(f"{path}: required")
        if branches(crd.get("oneOf", [])) != (ours.one_of[0] if ours.one_of else ()):
            diffs.append(f"{path}: oneOf")
        if branches(crd.get("anyOf", [])) != ours.any_of:
            diffs.append(f"{path}: anyOf")
        for key in set(crd["properties"]) & set(ours.fields):
            diffs += mirror_differences(crd["properties"][key], ours.fields[key], f"{path}.{key}")
        return diffs
    if kind == "object":
        if "additionalProperties" not in crd:
            ok = isinstance(ours, schema.Any_) or (isinstance(ours, schema.Obj) and not ours.fields)
            return [] if ok else [f"{path}: free-form object"]
        if not isinstance(ours, schema.Map):
            return [f"{path}: map"]
        return mirror_differences(crd["additionalProperties"], ours.values, f"{path}{{}}")
    if kind == "array":
        if not isinstance(ours, schema.Arr):
            return [f"{path}: array"]
        diffs = []
        if (crd.get("maxItems"), crd.get("minItems")) != (ours.max_items, ours.min_items):
            diffs.append(f"{path}: item counts")
        if (crd.get("x-kubernetes-list-type") == "set") != ours.unique:
            diffs.append(f"{path}: list-type set")
        return diffs + mirror_differences(crd["items"], ours.items, f"{path}[]")
    if kind == "string":
        if not isinstance(ours, schema.Str):
            return [f"{path}: string"]
        theirs = (tuple(crd.get("enum", ())), crd.get("pattern", ""), crd.get("maxLength"),
                  crd.get("minLength"), "cidr" if crd.get("format") == "cidr" else "")
        mine = (ours.enum, ours.pattern, ours.max_length, ours.min_length, ours.format)
        return [] if theirs == mine else [f"{path}: {theirs} != {mine}"]
    if kind == "integer":
        ok = isinstance(ours, schema.Int) and (crd.get("minimum"), crd.get("maximum")) == \
            (ours.minimum, ours.maximum)
        return [] if ok else [f"{path}: integer"]
    if kind == "boolean":
        return [] if isinstance(ours, schema.Bool) else [f"{path}: boolean"]
    return [f"{path}: unexpected CRD node {crd}"]


@pytest.mark.parametrize("kind", list(CRDS))
def test_tables_mirror_the_crd_field_by_field(kind):
    crd = yaml.safe_load(CRDS[kind].read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v2"]
    root = version["schema"]["openAPIV3Schema"]
    ours = {schema.KIND_CNP: schema.CNP, schema.KIND_CCNP: schema.CCNP}[kind]
    assert set(root["properties"]) == set(ours.fields)
    assert root["required"] == list(ours.required)
    diffs = []
    for field in ("spec", "specs", "status"):
        diffs += mirror_differences(root["properties"][field], ours.fields[field], field)
    assert not diffs, "\n".join(diffs)
