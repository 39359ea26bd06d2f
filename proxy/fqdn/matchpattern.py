"""FQDN names and patterns as Cilium 1.19 matches them (spec §9.1, §10): one matcher for all.

The DNS proxy, toFQDNs selection and `l7gate fqdn match` all call `compile_pattern` /
`compile_name` here, so a name is allowed by the same rule everywhere. Patterns become anchored
RE2 regexes exactly as Cilium's `pkg/fqdn/matchpattern` builds them; names are exact after
normalisation (lower-case, trailing dot). Compiled matchers are cached.

Never does I/O (except `run_match`, which writes the CLI's lines to the stream it is given),
never resolves names, never validates a whole policy (the sanitize layer does; we only refuse
to compile a selector Cilium would have rejected).
"""
from __future__ import annotations

import functools
import re
import sys
from dataclasses import dataclass
from typing import TextIO

import re2

# One DNS label character, as Cilium allows it (`_` too, for SRV names like `_tcp`).
_LABEL_CHAR = "[-a-zA-Z0-9_]"
# A pattern made only of stars (optionally dot-terminated) means "any valid name".
_LONE_STARS = re.compile(r"^[*]+[.]?$")
_ALL_NAMES_REGEX = f"(^({_LABEL_CHAR}+[.])+$)|(^[.]$)"
# Since 1.19 a leading `**.` (two or more stars, then a dot) spans one or more whole labels.
_MULTI_LABEL_PREFIX = re.compile(r"^[*]{2,}[.]")
_MULTI_LABEL_REGEX = f"({_LABEL_CHAR}+([.]{_LABEL_CHAR}+){{0,}})[.]"
_STAR_RUN = re.compile(r"[*]+")
_PATTERN_CHARS = re.compile(r"^[-a-zA-Z0-9_.*]*$")
_NAME_CHARS = re.compile(r"^[-a-zA-Z0-9_.]*$")
_MAX_LEN = 255

_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False  # errors are raised to the caller, not printed by the C++ library


def normalize_name(name: str) -> str:
    """A query or cached name as Cilium compares it: lower-case, with the final dot."""
    name = name.lower()
    return name if name.endswith(".") else name + "."


def sanitize(pattern: str) -> str:
    """Cilium's `Sanitize`: lone stars stay as written, anything else is lower-cased and dotted."""
    if _LONE_STARS.match(pattern):
        return pattern
    return normalize_name(pattern)


def to_regex(pattern: str) -> str:
    """The anchored RE2 regex Cilium builds for a (sanitized) matchPattern."""
    pattern = pattern.strip().lower()
    if _LONE_STARS.match(pattern):
        return _ALL_NAMES_REGEX
    prefix = ""
    head = _MULTI_LABEL_PREFIX.match(pattern)
    if head:
        prefix, pattern = _MULTI_LABEL_REGEX, pattern[head.end():]
    # Dots first: the label class inserted for the stars contains no dot to rewrite.
    body = _STAR_RUN.sub(f"{_LABEL_CHAR}*", pattern.replace(".", "[.]"))
    return f"^{prefix}{body}$"


def validate_pattern(pattern: str) -> str | None:
    """Why the agent would reject this matchPattern (spec §3), or None if it is acceptable."""
    if not _PATTERN_CHARS.match(pattern):
        return f'Invalid characters in MatchPattern: "{pattern}"'
    if len(pattern.strip()) > _MAX_LEN:
        return "Must be <= 255 characters long"
    return None


def validate_name(name: str) -> str | None:
    """Why the agent would reject this matchName (spec §3), or None if it is acceptable."""
    if not _NAME_CHARS.match(name):
        return f'Invalid characters in MatchName: "{name}"'
    if len(name.strip()) > _MAX_LEN:
        return "Must be <= 255 characters long"
    return None


@dataclass(frozen=True)
class Matcher:
    """A compiled matchName or matchPattern.

    `matches` normalises the name first; `matches_normalized` is for callers (the DNS proxy)
    that already hold a normalised qname, and for testing the raw regex as Cilium's tests do.
    """
    source: str  # the selector as written
    regex: str | None  # the anchored RE2 regex; None for an exact name or the DNS match-all
    exact: str | None = None  # the normalised name of a matchName
    match_all: bool = False  # the DNS-rule lone star: every name, even odd ones (spec §9.1)

    def matches(self, name: str) -> bool:
        return self.matches_normalized(normalize_name(name))

    def matches_normalized(self, name: str) -> bool:
        if self.match_all:
            return True
        if self.exact is not None:
            return name == self.exact
        return _compiled(self.regex).search(name) is not None


@functools.lru_cache(maxsize=4096)
def _compiled(regex: str):
    return re2.compile(regex, _RE2_OPTIONS)


@functools.lru_cache(maxsize=4096)
def compile_pattern(pattern: str, for_dns_rule: bool = False) -> Matcher:
    """Compile a matchPattern; raise ValueError for one the agent would reject.

    `for_dns_rule=True` is the flavour of a `rules.dns` entry inside the DNS proxy: there a
    lone-star pattern (`*`, `**`, `*.`, ...) matches every qname, even ones that are not valid
    names (Cilium swaps in a match-everything regex). In toFQDNs selection and the CLI the lone
    star only matches syntactically valid names (and the root `.`).
    """
    error = validate_pattern(pattern)
    if error:
        raise ValueError(error)
    pattern = pattern.strip()
    if for_dns_rule and _LONE_STARS.match(pattern):
        return Matcher(source=pattern, regex=None, match_all=True)
    regex = to_regex(sanitize(pattern))
    _compiled(regex)  # compile now so a bad pattern fails here, not on the first query
    return Matcher(source=pattern, regex=regex)


@functools.lru_cache(maxsize=4096)
def compile_name(name: str) -> Matcher:
    """Compile a matchName: exact comparison after normalisation (trim, lower-case, final dot)."""
    error = validate_name(name)
    if error:
        raise ValueError(error)
    return Matcher(source=name, regex=None, exact=normalize_name(name.strip()))


def run_match(pattern: str, names: list[str], out: TextIO) -> int:
    """`l7gate fqdn match PATTERN NAME...`: one `NAME<TAB>match|no match` line per name.

    PATTERN is a matchPattern (toFQDNs flavour). Exit 0 if every name matches, 1 if one does
    not, 2 if the pattern itself is invalid (message on stderr).
    """
    try:
        matcher = compile_pattern(pattern)
    except ValueError as e:
        print(f"l7gate fqdn match: invalid pattern: {e}", file=sys.stderr)
        return 2
    missed = False
    for name in names:
        ok = matcher.matches(name)
        missed = missed or not ok
        out.write(f"{name}\t{'match' if ok else 'no match'}\n")
    return 1 if missed else 0
