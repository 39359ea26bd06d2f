"""`l7gate policy validate` through the real console script (a subprocess, as users run it).

The contract (proxy/policy/validate.py): exit 0 when every document is valid, 1 otherwise;
`-o json` is a list of {file, kind, namespace, name, valid, errors: [{line, column, path,
message, layer}]} (+ `skipped` for objects that are not policies); text is one
`FILE:LINE:COL: <path>: <reason> [<layer>]` line per error and a summary line. Malformed input
is always a clear error and exit 1, never a traceback.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
from clitool import l7gate

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
TYPO = DATA / "invalid" / "knp-podselector-typo.yaml"
GOOD = DATA / "valid" / "cnp-every-field.yaml"
MALFORMED = DATA / "invalid" / "malformed"
DOC_KEYS = {"file", "kind", "namespace", "name", "valid", "errors"}
ERROR_KEYS = {"line", "column", "path", "message", "layer"}


def validate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(l7gate() + ["policy", "validate", *args], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)


def as_json(proc: subprocess.CompletedProcess) -> list[dict]:
    docs = json.loads(proc.stdout)
    assert isinstance(docs, list)
    for d in docs:
        assert DOC_KEYS <= set(d), d
        for e in d["errors"]:
            assert set(e) == ERROR_KEYS, e
    return docs


def test_json_valid_file_exit_0_and_shape():
    proc = validate("-o", "json", str(GOOD))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (doc,) = as_json(proc)
    assert doc == {"file": str(GOOD), "kind": "CiliumNetworkPolicy", "namespace": "shop",
                   "name": "shop-api", "valid": True, "errors": []}


def test_json_podselector_typo_exit_1_and_hint():
    proc = validate("-o", "json", str(TYPO))
    assert proc.returncode == 1
    (doc,) = as_json(proc)
    assert (doc["kind"], doc["namespace"], doc["name"], doc["valid"]) == \
        ("NetworkPolicy", "shop", "knp-podselector-typo", False)
    typo = [e for e in doc["errors"] if e["path"] == "spec.PodSelector"]
    assert typo == [{"line": 10, "column": 3, "path": "spec.PodSelector", "layer": "schema",
                     "message": 'unknown field "PodSelector" (did you mean "podSelector"?)'}]


def test_text_lines_are_file_line_col_path_reason_layer():
    rel = os.path.relpath(TYPO, ROOT)
    proc = validate(rel)
    assert proc.returncode == 1
    lines = proc.stdout.splitlines()
    assert f'{rel}:10:3: spec.PodSelector: unknown field "PodSelector" (did you mean "podSelector"?) [schema]' \
        in lines
    assert all(re.match(rf"{re.escape(rel)}:\d+:\d+: \S+: .+ \[(yaml|schema|agent)\]$", ln) for ln in lines[:-1])
    assert lines[-1] == "1 document in 1 file: 0 valid, 1 invalid (2 errors)"


def test_directory_argument_names_files_as_joined_and_lists_skipped_kinds():
    arg = os.path.relpath(DATA / "valid", ROOT)
    proc = validate("-o", "json", arg)
    assert proc.returncode == 0, proc.stdout[-2000:]
    docs = as_json(proc)
    assert {d["file"] for d in docs} == {os.path.join(arg, p.name) for p in (DATA / "valid").iterdir()}
    skipped = [d for d in docs if "skipped" in d]
    assert [(d["kind"], d["valid"]) for d in skipped] == [("ConfigMap", True), ("Deployment", True),
                                                          ("Service", True)]
    text = validate(arg)
    assert text.returncode == 0
    assert f'{arg}/workloads-and-policy.yaml:4:1: skipped: Deployment "web" (apps/v1) is not a network policy' \
        in text.stdout.splitlines()


def test_one_invalid_file_among_valid_ones_exits_1_and_reports_both():
    proc = validate("-o", "json", str(GOOD), str(TYPO))
    assert proc.returncode == 1
    assert [d["valid"] for d in as_json(proc)] == [True, False]


def make_big(tmp: Path) -> Path:
    f = tmp / "big.yaml"
    with open(f, "w") as out:
        out.write("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: big}\n"
                  "spec:\n  endpointSelector: {}\n  egress:\n  - toCIDR:\n")
        out.write("    - 10.0.0.0/8\n" * (20 * 1024 * 1024 // 17))
    return f


def make_file(name: str, data: bytes):
    def make(tmp: Path) -> Path:
        f = tmp / name
        f.write_bytes(data)
        return f
    return make


MALFORMED_CASES = {
    "YAML syntax error": (lambda tmp: MALFORMED / "syntax-error.yaml", "yaml", "did not find expected"),
    "tab indentation": (lambda tmp: MALFORMED / "tab-indentation.yaml", "yaml", "must use spaces"),
    "wrong types": (lambda tmp: MALFORMED / "string-where-list.yaml", "schema", "must be of type array"),
    "20 MB file": (make_big, "yaml", "file is too large"),
    "alias bomb": (lambda tmp: MALFORMED / "alias-bomb.yaml", "yaml", "expands to more than"),
    "binary garbage": (make_file("garbage.yaml", bytes(range(256)) * 64), "yaml", "not a text file"),
    "empty file": (make_file("empty.yaml", b""), "yaml", "file holds no YAML document"),
    "document is a list": (lambda tmp: MALFORMED / "document-is-list.yaml", "schema", "not an array"),
    "document is a scalar": (lambda tmp: MALFORMED / "document-is-scalar.yaml", "schema", "not a string"),
    "unknown kind": (lambda tmp: MALFORMED / "kind-typo.yaml", "schema", 'unknown kind "CiliumNetworkPolcy"'),
    "missing file": (lambda tmp: tmp / "no-such-file.yaml", "yaml", "cannot read file"),
}


@pytest.mark.parametrize("case", list(MALFORMED_CASES))
@pytest.mark.parametrize("output", ["text", "json"])
def test_malformed_input_is_a_clear_error_with_exit_1(case, output, tmp_path):
    make, layer, message = MALFORMED_CASES[case]
    path = make(tmp_path)
    proc = validate("-o", output, str(path))
    assert proc.returncode == 1, proc.stdout[-1000:] + proc.stderr[-1000:]
    assert "Traceback" not in proc.stderr and proc.stderr == "", proc.stderr[-2000:]
    if output == "json":
        errors = [e for d in as_json(proc) for e in d["errors"]]
        assert any(e["layer"] == layer and message in e["message"] for e in errors), errors
    else:
        assert any(ln.startswith(f"{path}:") and message in ln and ln.endswith(f"[{layer}]")
                   for ln in proc.stdout.splitlines()), proc.stdout[-2000:]
