"""FQDN pattern semantics (spec §9.1, §10): Cilium's own table, sanitize/regex vectors, the CLI."""
from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest

from proxy.fqdn import matchpattern as mp

# (pattern, name, match): spec §10, from Cilium's matchpattern_test.go; names already normalised,
# so they go through the raw regex (`matches_normalized`), exactly as Cilium's test does.
CILIUM_TABLE = [
    ("cilium.io.", "cilium.io.", True),
    ("cilium.io.", "anysub.cilium.io.", False),
    ("cilium.io.", "", False),
    ("*.cilium.io.", "anysub.cilium.io.", True),
    ("*.cilium.io.", "cilium.io.", False),
    ("*.cilium.io.", "anysub.ci.io.", False),
    ("*.cilium.io.", "anysub.ciliumandmore.io.", False),
    ("*.ci*.io.", "anysub.cilium.io.", True),
    ("*.ci*.io.", "anysub.ci.io.", True),
    ("*.ci*.io.", "anysub.ciliumandmore.io.", True),
    ("*.ci*.io.", "cilium.io.", False),
    ("*.ci**.io.", "anysub.ci.io.", True),
    ("*.ci**.io.", "cilium.io.", False),
    ("*", ".", True),
    ("*", "io.", True),
    ("*", "service.namesace.svc.cluster.local.", True),
    ("*", "_foobar._tcp.cilium.io.", True),
    ("*", ".io.", False),
    ("*", ".svc.cluster.local.", False),
    ("*", "cilium.io", False),
    ("*", "", False),
    ("**", "cilium.io.", True),
    ("**", ".cilium.io.", False),
    (".", ".", True),
    (".", ".io.", False),
    ("_foobar._tcp.cilium.io.", "_foobar._tcp.cilium.io.", True),
    ("_foobar._tcp.cilium.io.", "_tcp.cilium.io.", False),
    ("*.*.cilium.io.", "_foobar._tcp.cilium.io.", True),
    ("**.cilium.io.", "test.cilium.io.", True),
    ("**.cilium.io.", "test.app.cilium.io.", True),
    ("**.cilium.io.", "test.app.new.cilium.io.", True),
    ("**.cilium.io.", "cilium.io.", False),
    ("**.cilium.io.", "anysub.ciliumandmore.io.", False),
    ("***.cilium.io.", "test.app.cilium.io.", True),
    ("**.*.cilium.io.", "_foo._bar._tcp.cilium.io.", True),
    ("**.*.cilium.io.", "foo.cilium.io.", False),
    ("**.ci*.io.", "foo.bar.cilium.io.", True),
    ("**.ci*.io.", "_foo._bar.ciliumandmore.io.", True),
    ("**.ci*.io.", "test.calium.io.", False),
]


@pytest.mark.parametrize("pattern,name,expected", CILIUM_TABLE,
                         ids=[f"{p!r}~{n!r}" for p, n, _ in CILIUM_TABLE])
def test_cilium_table(pattern, name, expected):
    assert mp.compile_pattern(pattern).matches_normalized(name) is expected


SANITIZE = [("*", "*"), ("*.", "*."), ("*.com", "*.com."), ("**", "**"), ("***.", "***."),
            ("**.com", "**.com."), ("API.GitHub.com", "api.github.com."), ("cilium.io.", "cilium.io.")]


@pytest.mark.parametrize("pattern,expected", SANITIZE, ids=[p for p, _ in SANITIZE])
def test_sanitize(pattern, expected):
    assert mp.sanitize(pattern) == expected


REGEX = [
    ("cilium.io.", r"^cilium[.]io[.]$"),
    ("*.cilium.io.", r"^[-a-zA-Z0-9_]*[.]cilium[.]io[.]$"),
    ("**.cilium.io.", r"^([-a-zA-Z0-9_]+([.][-a-zA-Z0-9_]+){0,})[.]cilium[.]io[.]$"),
    (".", r"^[.]$"),
    ("*", r"(^([-a-zA-Z0-9_]+[.])+$)|(^[.]$)"),
    ("***.", r"(^([-a-zA-Z0-9_]+[.])+$)|(^[.]$)"),
    ("test.**.cilium.io.", r"^test[.][-a-zA-Z0-9_]*[.]cilium[.]io[.]$"),
    ("*.ci**.io.", r"^[-a-zA-Z0-9_]*[.]ci[-a-zA-Z0-9_]*[.]io[.]$"),
]


@pytest.mark.parametrize("pattern,expected", REGEX, ids=[p for p, _ in REGEX])
def test_to_regex(pattern, expected):
    assert mp.to_regex(pattern) == expected


# (case, pattern, raw name as a user or a resolver gives it, match): through `matches`,
# which normalises the name first.
NORMALISED = [
    ("seed: one label under github.com", "*.github.com", "api.github.com", True),
    ("seed: another label under github.com", "*.github.com", "support.github.com", True),
    ("seed: the apex is not a subdomain", "*.github.com", "github.com", False),
    ("seed: * spans one label only", "*.github.com", "a.b.github.com", False),
    ("seed: **. spans several labels", "**.github.com", "a.b.github.com", True),
    ("**. spans one label too", "**.github.com", "a.github.com", True),
    ("**. needs at least one label", "**.github.com", "github.com", False),
    ("name is lower-cased", "*.github.com", "API.GitHub.com", True),
    ("pattern is lower-cased", "*.GitHub.COM", "api.github.com", True),
    ("trailing dot on the name", "*.github.com", "api.github.com.", True),
    ("trailing dot on the pattern", "*.github.com.", "api.github.com", True),
    ("plain name in a pattern is exact", "github.com", "github.com.", True),
    ("plain name does not match a subdomain", "github.com", "api.github.com", False),
    ("leading * without dot stays in one label", "*github.com", "mygithub.com", True),
    ("leading * without dot matches empty", "*github.com", "github.com", True),
    ("leading * without dot: not a subdomain", "*github.com", "www.github.com", False),
    ("star inside a label", "sub*.cilium.io", "subdomain.cilium.io", True),
    ("star inside a label may be empty", "sub*.cilium.io", "sub.cilium.io", True),
    ("lone star: any name once dotted", "*", "cilium.io", True),
    ("lone star: not an odd name", "*", "bad name.io", False),
    ("regex metachar in name is literal", "*.github.com", "apiXgithub.com", False),
]


@pytest.mark.parametrize("case,pattern,name,expected", NORMALISED, ids=[c for c, *_ in NORMALISED])
def test_matches_normalises_names(case, pattern, name, expected):
    assert mp.compile_pattern(pattern).matches(name) is expected


# DNS-rule flavour (spec §9.1): a lone star matches every qname, even odd ones.
DNS_FLAVOUR = [
    ("lone star, odd name", "*", ".io.", True, False),
    ("double star, odd name", "**", ".svc.cluster.local.", True, False),
    ("star-dot, name with a space", "*.", "bad name.", True, False),
    ("lone star, empty", "*", "", True, False),
    ("lone star, valid name (both)", "*", "cilium.io.", True, True),
    ("other patterns unchanged", "*.cilium.io", ".io.", False, False),
    ("other patterns still anchored", "*.cilium.io", "a.cilium.io.", True, True),
]


@pytest.mark.parametrize("case,pattern,name,dns_rule,to_fqdns", DNS_FLAVOUR,
                         ids=[c for c, *_ in DNS_FLAVOUR])
def test_dns_rule_flavour(case, pattern, name, dns_rule, to_fqdns):
    assert mp.compile_pattern(pattern, for_dns_rule=True).matches_normalized(name) is dns_rule
    assert mp.compile_pattern(pattern).matches_normalized(name) is to_fqdns


NAMES = [
    ("exact", "api.github.com", "api.github.com", True),
    ("case and dot", "API.github.com", "api.GITHUB.com.", True),
    ("no subdomain", "github.com", "api.github.com", False),
    ("no wildcard meaning for star-free dots", "a.b.com", "aXb.com", False),
]


@pytest.mark.parametrize("case,selector,name,expected", NAMES, ids=[c for c, *_ in NAMES])
def test_compile_name_is_exact(case, selector, name, expected):
    assert mp.compile_name(selector).matches(name) is expected


INVALID = [
    ("pattern with +", mp.compile_pattern, "a+b.com", "Invalid characters in MatchPattern"),
    ("pattern with brackets", mp.compile_pattern, "[a].com", "Invalid characters in MatchPattern"),
    ("pattern with space", mp.compile_pattern, " *.a.com", "Invalid characters in MatchPattern"),
    ("pattern too long", mp.compile_pattern, "a" * 256, "Must be <= 255 characters long"),
    ("name with star", mp.compile_name, "*.a.com", "Invalid characters in MatchName"),
    ("name too long", mp.compile_name, "a" * 256, "Must be <= 255 characters long"),
]


@pytest.mark.parametrize("case,fn,arg,message", INVALID, ids=[c for c, *_ in INVALID])
def test_invalid_selectors_refused(case, fn, arg, message):
    with pytest.raises(ValueError, match=message):
        fn(arg)


NORMALIZE = [("a.B.com", "a.b.com."), ("a.b.com.", "a.b.com."), ("", "."), ("CILIUM.IO", "cilium.io.")]


@pytest.mark.parametrize("name,expected", NORMALIZE, ids=[n or "empty" for n, _ in NORMALIZE])
def test_normalize_name(name, expected):
    assert mp.normalize_name(name) == expected


def test_compiled_patterns_are_cached():
    assert mp.compile_pattern("*.cache.example") is mp.compile_pattern("*.cache.example")


RUN_MATCH = [
    ("one miss -> 1", "*.example.com", ["a.example.com", "example.com"],
     "a.example.com\tmatch\nexample.com\tno match\n", 1),
    ("all match -> 0", "**.example.com", ["a.b.example.com", "c.example.com."],
     "a.b.example.com\tmatch\nc.example.com.\tmatch\n", 0),
    ("name echoed as given", "*.example.com", ["API.Example.COM"], "API.Example.COM\tmatch\n", 0),
    ("plain name is exact", "example.com", ["example.com", "www.example.com"],
     "example.com\tmatch\nwww.example.com\tno match\n", 1),
    ("none match -> 1", "*.example.com", ["example.org"], "example.org\tno match\n", 1),
]


@pytest.mark.parametrize("case,pattern,names,output,code", RUN_MATCH, ids=[c for c, *_ in RUN_MATCH])
def test_run_match(case, pattern, names, output, code):
    out = io.StringIO()
    assert mp.run_match(pattern, names, out) == code
    assert out.getvalue() == output


def test_run_match_invalid_pattern_exits_2_and_prints_nothing_on_stdout(capsys):
    out = io.StringIO()
    assert mp.run_match("a+b.com", ["a.com"], out) == 2
    assert out.getvalue() == ""
    assert "Invalid characters in MatchPattern" in capsys.readouterr().err


def test_cli_subprocess():
    exe = os.path.join(os.path.dirname(sys.executable), "l7gate")
    p = subprocess.run([exe, "fqdn", "match", "*.example.com", "a.example.com", "example.com"],
                       capture_output=True, text=True, timeout=60)
    assert (p.returncode, p.stdout) == (1, "a.example.com\tmatch\nexample.com\tno match\n")
