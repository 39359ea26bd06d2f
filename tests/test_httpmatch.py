"""The shared HTTP rule matcher and path normalisation (spec §8.1), as tables."""
from __future__ import annotations

import os

import pytest
import yaml

from proxy.policy.api import HeaderMatch, PortRuleHTTP
from proxy.policy.httpmatch import (HeaderEdit, HeaderLog, HTTPRequest, HTTPRuleError, apply_edits,
                                    compile_rule, compile_rules, match_any, normalize_path,
                                    validate_regex)

DATA = os.path.join(os.path.dirname(__file__), "data", "http_paths.yaml")


def R(**kw) -> PortRuleHTTP:
    """A rule as the YAML would give it: R(method="GET", header_matches=[HM("X")])."""
    return PortRuleHTTP(**kw)


HM = HeaderMatch


def Q(method="GET", path="/", host="example.com", headers=()) -> HTTPRequest:
    return HTTPRequest(method, path, host, tuple(headers))


# (case, rule, request, allowed)
SINGLE_RULE = [
    # seeds: the Star Wars demo
    ("seed: POST /v1/request-landing allowed", R(method="POST", path="/v1/request-landing"),
     Q("POST", "/v1/request-landing"), True),
    ("seed: PUT /v1/exhaust-port denied", R(method="POST", path="/v1/request-landing"),
     Q("PUT", "/v1/exhaust-port"), False),
    ("other method, right path", R(method="POST", path="/v1/request-landing"),
     Q("GET", "/v1/request-landing"), False),
    # path: full match, query included
    ("path exact", R(path="/public"), Q(path="/public"), True),
    ("path is a full match, not a prefix", R(path="/public"), Q(path="/public/x"), False),
    ("path includes the query", R(path="/public"), Q(path="/public?x=1"), False),
    ("path .* covers the query", R(path="/public.*"), Q(path="/public?x=1"), True),
    ("optional query group", R(path="/public(\\?.*)?"), Q(path="/public?x=1"), True),
    ("optional query group is not a prefix", R(path="/public(\\?.*)?"), Q(path="/public/x"), False),
    ("path regex class", R(path="/items/[0-9]+"), Q(path="/items/42"), True),
    ("path regex class refuses letters", R(path="/items/[0-9]+"), Q(path="/items/4a"), False),
    ("path is case-sensitive", R(path="/public"), Q(path="/PUBLIC"), False),
    # method
    ("GET does not match get", R(method="GET"), Q("get"), False),
    ("GET matches GET", R(method="GET"), Q("GET"), True),
    ("alternation", R(method="GET|HEAD"), Q("HEAD"), True),
    ("alternation is anchored", R(method="GET|HEAD"), Q("HEADX"), False),
    ("(?i) makes it case-insensitive", R(method="(?i)get"), Q("GET"), True),
    # host (:authority, port included)
    ("host exact", R(host="api.example.com"), Q(host="api.example.com"), True),
    ("host with port does not match a port-less regex", R(host="api.example.com"),
     Q(host="api.example.com:8080"), False),
    ("host regex with port", R(host="api.example.com:8080"), Q(host="api.example.com:8080"), True),
    ("host optional port", R(host="api[.]example[.]com(:[0-9]+)?"), Q(host="api.example.com:80"), True),
    ("unescaped dot matches any char", R(host="foo.bar.com"), Q(host="fooXbar.com"), True),
    ("escaped dot does not", R(host="foo\\.bar\\.com"), Q(host="fooXbar.com"), False),
    ("host regex needs a host", R(host=".*"), Q(host=None), False),
    ("Host header stands in for a missing host field", R(host="h:1"), Q(host=None, headers=[("Host", "h:1")]), True),
    # empty rule
    ("empty rule matches everything", R(), Q("DELETE", "/anything?x", host=None), True),
    # headers strings
    ("header presence", R(headers=["X-Token"]), Q(headers=[("X-Token", "abc")]), True),
    ("header presence, absent", R(headers=["X-Token"]), Q(headers=[("X-Other", "abc")]), False),
    ("header presence, empty value counts", R(headers=["X-Token"]), Q(headers=[("X-Token", "")]), True),
    ("header name case-insensitive", R(headers=["x-TOKEN"]), Q(headers=[("X-Token", "abc")]), True),
    ("'Name: value' exact", R(headers=["X-Token: abc"]), Q(headers=[("x-token", "abc")]), True),
    ("'Name value' exact", R(headers=["X-Token abc"]), Q(headers=[("X-Token", "abc")]), True),
    ("value is case-sensitive", R(headers=["X-Token: abc"]), Q(headers=[("X-Token", "ABC")]), False),
    ("value is exact, not a prefix", R(headers=["X-Token: abc"]), Q(headers=[("X-Token", "abcd")]), False),
    ("value is not a regex", R(headers=["X-Token: a.c"]), Q(headers=[("X-Token", "abc")]), False),
    ("value after the first space kept whole", R(headers=["X-Key: two words"]),
     Q(headers=[("X-Key", "two words")]), True),
    ("extra spaces belong to the value", R(headers=["X-Key:  v"]), Q(headers=[("X-Key", "v")]), False),
    ("'Name:' without a space names a header with a colon", R(headers=["X-Token:"]),
     Q(headers=[("X-Token", "abc")]), False),
    ("repeated header values joined with a comma", R(headers=["X-A: 1,2"]),
     Q(headers=[("X-A", "1"), ("x-a", "2")]), True),
    ("repeated header: one value is not enough", R(headers=["X-A: 1"]),
     Q(headers=[("X-A", "1"), ("X-A", "2")]), False),
    ("Host header string checks the authority", R(headers=["Host: api.example.com"]),
     Q(host="api.example.com"), True),
    ("all fields must match", R(method="GET", path="/a", headers=["X-A"]), Q("GET", "/a"), False),
    # headerMatches without an action
    ("headerMatch presence", R(header_matches=[HM("X-Token")]), Q(headers=[("X-Token", "1")]), True),
    ("headerMatch presence, absent", R(header_matches=[HM("X-Token")]), Q(), False),
    ("headerMatch value", R(header_matches=[HM("X-Token", "s3cr3t")]), Q(headers=[("x-token", "s3cr3t")]), True),
    ("headerMatch wrong value", R(header_matches=[HM("X-Token", "s3cr3t")]), Q(headers=[("X-Token", "x")]), False),
    ("secret without value never matches", R(header_matches=[HM("X-Token", secret={"name": "s"})]),
     Q(headers=[("X-Token", "anything")]), False),
    ("secret without value never matches, even with LOG",
     R(header_matches=[HM("X-Token", secret={"name": "s"}, mismatch="LOG")]), Q(), False),
    ("secret with a value falls back to the value",
     R(header_matches=[HM("X-Token", "v", secret={"name": "s"})]), Q(headers=[("X-Token", "v")]), True),
    # headerMatches with an action still let the rule match
    ("LOG on mismatch still matches", R(header_matches=[HM("X-Token", "v", mismatch="LOG")]), Q(), True),
    ("ADD on mismatch still matches", R(header_matches=[HM("X-Token", "v", mismatch="ADD")]), Q(), True),
    ("actions do not rescue other fields", R(method="POST", header_matches=[HM("X", "v", mismatch="LOG")]),
     Q("GET"), False),
]


@pytest.mark.parametrize("case,rule,request_,allowed", SINGLE_RULE, ids=[c for c, *_ in SINGLE_RULE])
def test_single_rule(case, rule, request_, allowed):
    assert compile_rule(rule).matches(request_) is allowed


# (case, headerMatch, request headers, edits, logs)
ACTIONS = [
    ("matching value: nothing to do", HM("X-A", "1", mismatch="REPLACE"), [("X-A", "1")], [], []),
    ("present, presence-only: nothing to do", HM("X-A", mismatch="LOG"), [("X-A", "z")], [], []),
    ("LOG logs, edits nothing", HM("X-A", "1", mismatch="LOG"), [("X-A", "2")], [],
     [HeaderLog("X-A", "1", "LOG")]),
    ("ADD appends when absent", HM("X-A", "1", mismatch="ADD"), [], [HeaderEdit("add", "X-A", "1")],
     [HeaderLog("X-A", "1", "ADD")]),
    ("ADD appends even over a wrong value", HM("X-A", "1", mismatch="ADD"), [("X-A", "2")],
     [HeaderEdit("add", "X-A", "1")], [HeaderLog("X-A", "1", "ADD")]),
    ("ADD without value adds an empty header", HM("X-A", mismatch="ADD"), [],
     [HeaderEdit("add", "X-A", "")], [HeaderLog("X-A", "", "ADD")]),
    ("DELETE removes a wrong value", HM("X-A", "1", mismatch="DELETE"), [("X-A", "2")],
     [HeaderEdit("delete", "X-A")], [HeaderLog("X-A", "1", "DELETE")]),
    ("DELETE of an absent header only logs", HM("X-A", "1", mismatch="DELETE"), [], [],
     [HeaderLog("X-A", "1", "DELETE")]),
    ("REPLACE sets the value", HM("X-A", "1", mismatch="REPLACE"), [("x-a", "2")],
     [HeaderEdit("replace", "X-A", "1")], [HeaderLog("X-A", "1", "REPLACE")]),
    ("REPLACE adds when absent", HM("X-A", "1", mismatch="REPLACE"), [],
     [HeaderEdit("replace", "X-A", "1")], [HeaderLog("X-A", "1", "REPLACE")]),
]


@pytest.mark.parametrize("case,hm,headers,edits,logs", ACTIONS, ids=[c for c, *_ in ACTIONS])
def test_header_actions(case, hm, headers, edits, logs):
    result = compile_rule(R(header_matches=[hm])).match(Q(headers=headers))
    assert (result.allowed, list(result.header_edits), list(result.logs)) == (True, edits, logs)


def test_actions_in_one_rule_see_each_other():
    rule = R(header_matches=[HM("X-A", "1", mismatch="REPLACE"), HM("X-A", "1", mismatch="LOG")])
    result = compile_rule(rule).match(Q(headers=[("X-A", "2")]))
    assert list(result.logs) == [HeaderLog("X-A", "1", "REPLACE")]


GET_A = R(method="GET", path="/a")
ANY_GET = R(method="GET")
# (case, rules, request, allowed, rule_index, edits, logs)
MATCH_ANY = [
    ("first matching rule reported", [GET_A, ANY_GET], Q("GET", "/a"), True, 0, [], []),
    ("later rule decides", [GET_A, ANY_GET], Q("GET", "/b"), True, 1, [], []),
    ("no rule matches", [GET_A, ANY_GET], Q("POST", "/a"), False, None, [], []),
    ("empty list allows all", [], Q("POST", "/x"), True, None, [], []),
    ("wildcard rule from merging allows all", [GET_A, R()], Q("DELETE", "/z"), True, 1, [], []),
    ("with actions every rule is evaluated",
     [R(), R(header_matches=[HM("X-A", "1", mismatch="REPLACE")])], Q(), True, 0,
     [HeaderEdit("replace", "X-A", "1")], [HeaderLog("X-A", "1", "REPLACE")]),
    ("a later rule sees an earlier rule's edit",
     [R(header_matches=[HM("X-A", "1", mismatch="ADD")]), R(header_matches=[HM("X-A", "1", mismatch="LOG")])],
     Q(), True, 0, [HeaderEdit("add", "X-A", "1")], [HeaderLog("X-A", "1", "ADD")]),
    ("edits only from rules that matched",
     [R(method="POST", header_matches=[HM("X-A", "1", mismatch="ADD")]), ANY_GET], Q("GET"), True, 1, [], []),
    ("edited header can satisfy a later plain rule",
     [R(method="POST"), R(path="/x", header_matches=[HM("X-A", "1", mismatch="ADD")]), R(headers=["X-A: 1"])],
     Q("GET", "/x"), True, 1, [HeaderEdit("add", "X-A", "1")], [HeaderLog("X-A", "1", "ADD")]),
    ("never-matching secret rule skipped", [R(header_matches=[HM("X", secret={"name": "s"})]), ANY_GET],
     Q("GET"), True, 1, [], []),
]


@pytest.mark.parametrize("case,rules,request_,allowed,index,edits,logs", MATCH_ANY, ids=[c for c, *_ in MATCH_ANY])
def test_match_any(case, rules, request_, allowed, index, edits, logs):
    result = match_any(compile_rules(rules), request_)
    assert (result.allowed, result.rule_index, list(result.header_edits), list(result.logs)) == \
        (allowed, index, edits, logs)


# (case, edits, request, expected request)
APPLY = [
    ("add appends", [HeaderEdit("add", "X-A", "1")], Q(headers=[("X-A", "0")]),
     Q(headers=[("X-A", "0"), ("X-A", "1")])),
    ("delete removes every value, any case", [HeaderEdit("delete", "x-a")],
     Q(headers=[("X-A", "0"), ("B", "b"), ("x-A", "2")]), Q(headers=[("B", "b")])),
    ("replace leaves one value", [HeaderEdit("replace", "X-A", "1")], Q(headers=[("x-a", "0"), ("X-A", "2")]),
     Q(headers=[("X-A", "1")])),
    ("replace on host sets the authority", [HeaderEdit("replace", "Host", "b:1")], Q(host="a"), Q(host="b:1")),
    ("delete on host clears it", [HeaderEdit("delete", "host")], Q(host="a", headers=[("Host", "a")]),
     Q(host=None)),
]


@pytest.mark.parametrize("case,edits,request_,expected", APPLY, ids=[c for c, *_ in APPLY])
def test_apply_edits(case, edits, request_, expected):
    assert apply_edits(request_, edits) == expected


REGEX_ERRORS = [
    ("lone star", "*", "missing argument to repetition operator: `*`"),
    ("open paren", "a(", "missing closing ): `a(`"),
    ("open bracket", "[a", "missing closing ]: `[a`"),
    ("stray paren", "a)", "unexpected ): `a)`"),
    ("nested repetition", "a**", "invalid nested repetition operator: `**`"),
    ("repeat count too big", "x{1001}", "invalid repeat count: `{1001}`"),
    ("bad range", "[z-a]", "invalid character class range: `z-a`"),
    ("bad escape", "\\8", "invalid escape sequence: `\\8`"),
    ("lookbehind", "(?<=a)b", "invalid or unsupported Perl syntax: `(?<=`"),
    ("trailing backslash", "a\\", "trailing backslash at end of expression: ``"),
    ("valid path", "/v1/.*", None),
    ("valid alternation", "GET|HEAD", None),
    ("valid flags", "(?i)get", None),
]


@pytest.mark.parametrize("case,pattern,message", REGEX_ERRORS, ids=[c for c, *_ in REGEX_ERRORS])
def test_validate_regex(case, pattern, message):
    assert validate_regex(pattern) == message


COMPILE_ERRORS = [
    ("bad path regex", R(path="*"), "invalid path regex '*': missing argument to repetition operator: `*`"),
    ("bad method regex", R(method="GET("), "invalid method regex 'GET(': missing closing ): `GET(`"),
    ("bad host regex", R(host="[a"), "invalid host regex '[a': missing closing ]: `[a`"),
    ("unknown mismatch action", R(header_matches=[HM("X", mismatch="DROP")]), "Invalid header action: DROP"),
    ("headerMatch without name", R(header_matches=[HM("")]), "Header name missing"),
    ("header string with empty name", R(headers=[" v"]), "empty name"),
]


@pytest.mark.parametrize("case,rule,message", COMPILE_ERRORS, ids=[c for c, *_ in COMPILE_ERRORS])
def test_compile_errors(case, rule, message):
    with pytest.raises(HTTPRuleError) as err:
        compile_rule(rule)
    assert message in str(err.value)


with open(DATA) as f:
    PATHS = yaml.safe_load(f)


@pytest.mark.parametrize("case", PATHS, ids=[c["name"] for c in PATHS])
def test_normalize_path_corpus(case):
    assert normalize_path(case["raw"], method=case.get("method", "GET")) == case["expected"]


@pytest.mark.parametrize("case", [c for c in PATHS if c["expected"] not in (None, "*")],
                         ids=[c["name"] for c in PATHS if c["expected"] not in (None, "*")])
def test_normalize_path_is_idempotent(case):
    once = normalize_path(case["raw"])
    assert normalize_path(once) == once


def test_normalize_path_accepts_bytes():
    assert normalize_path(b"/caf\xc3\xa9/./x") == "/caf%C3%A9/x"


# Matching happens on the normalised path: (case, rule, raw target, allowed; None = 400)
WIRE = [
    ("dot segment cannot dodge an exact rule", R(path="/v1/request-landing"), "/v1/./request-landing", True),
    ("doubled slashes still match", R(path="/v1/request-landing"), "//v1//request-landing", True),
    ("encoded traversal leaves the allowed prefix", R(path="/public/.*"), "/public/%2e%2e/admin", False),
    ("escaped slash traversal leaves the allowed prefix", R(path="/public/.*"), "/public/..%2Fadmin", False),
    ("unreserved escapes cannot dodge a deny-by-omission", R(path="/v1/.*"), "/%76%31/x", True),
    ("query still part of the path", R(path="/v1/x"), "/v1/./x?debug=1", False),
    ("NUL is a 400, not a match", R(), "/v1\x00", None),
]


@pytest.mark.parametrize("case,rule,target,allowed", WIRE, ids=[c for c, *_ in WIRE])
def test_match_on_normalised_path(case, rule, target, allowed):
    request = HTTPRequest.from_wire("GET", target, "example.com", [])
    if allowed is None:
        assert request is None
    else:
        assert compile_rule(rule).matches(request) is allowed
