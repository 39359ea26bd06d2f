"""The one HTTP rule matcher (spec §8.1): Cilium `PortRuleHTTP` lists, compiled, against requests.

Shared by the uvloop fast path, the mitmproxy bridge and `trace`, so a request gets the same
verdict everywhere. It mirrors what Cilium hands Envoy: `method`/`path`/`host` are RE2 full
matches on `:method`/`:path`/`:authority`; `headers` strings and `headerMatches` without a
mismatch action become header matchers; `headerMatches` with an action are checked afterwards
and yield header edits (cilium.l7policy's HeaderMatch). `normalize_path` is Envoy's path
normalisation as Cilium configures it; the proxies match and forward the path it returns.

Never does I/O, never parses HTTP (the proxies hand in method, target, host and headers), never
answers a request (the caller sends 403/400), never reads Kubernetes secrets: a headerMatch
backed by a secret uses its inline `value` if it has one (Cilium's fallback when the secret is
unavailable) and otherwise makes its rule never match.
"""
from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

import re2

from proxy.policy.api import PortRuleHTTP

MISMATCH_ACTIONS = ("", "LOG", "ADD", "DELETE", "REPLACE")

_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False  # errors go to the caller, not to stderr from the C++ library

# C++ RE2's error codes -> Go regexp/syntax wording (what `cilium-agent` prints on validation).
_GO_WORDING = {
    "invalid escape sequence": "invalid escape sequence",
    "invalid character class range": "invalid character class range",
    "invalid character class": "invalid character class",
    "missing ]": "missing closing ]",
    "missing )": "missing closing )",
    "unexpected )": "unexpected )",
    "trailing \\": "trailing backslash at end of expression",
    "no argument for repetition operator": "missing argument to repetition operator",
    "invalid repetition size": "invalid repeat count",
    "bad repetition operator": "invalid nested repetition operator",
    "invalid perl operator": "invalid or unsupported Perl syntax",
    "invalid UTF-8": "invalid UTF-8",
    "invalid named capture group": "invalid named capture",
    "pattern too large - compile failed": "expression too large",
    "pattern too large - reverse compile failed": "expression too large",
}


class HTTPRuleError(ValueError):
    """A PortRuleHTTP that cannot be compiled (bad regex, header action or header name)."""


def validate_regex(pattern: str) -> str | None:
    """Go RE2's complaint about `pattern` (without Go's "error parsing regexp: "), or None.

    The text follows Go's wording; the quoted fragment comes from C++ RE2 and may differ from
    Go's in rare cases. C++ RE2 also accepts a few things Go refuses (e.g. `\\C`).
    """
    try:
        _regex(pattern)
    except re2.error as e:
        raw = e.args[0].decode() if isinstance(e.args[0], bytes) else str(e.args[0])
        for code, wording in _GO_WORDING.items():
            if raw == code or raw.startswith(code + ": "):
                return f"{wording}: `{raw[len(code) + 2:]}`"
        return raw
    return None


@functools.lru_cache(maxsize=4096)
def _regex(pattern: str):
    return re2.compile(pattern, _RE2_OPTIONS)


# --- requests -------------------------------------------------------------------------------

@dataclass(slots=True)
class HTTPRequest:
    """What the matcher sees of a request. `path` is the normalised target, query included.
    Treat it as read-only (`dataclasses.replace` makes a changed copy): not frozen, because a
    frozen dataclass costs ~0.4 us more to build, on every request the proxy reads."""
    method: str
    path: str
    host: str | None = None  # Host / :authority as sent, port included; None when absent
    headers: tuple[tuple[str, str], ...] = ()  # (name, value) in arrival order, case kept

    @classmethod
    def from_wire(cls, method: str, target: str | bytes, host: str | None = None,
                  headers: Iterable[tuple[str, str]] = ()) -> HTTPRequest | None:
        """Build a request from the raw request-target; None means answer 400."""
        path = normalize_path(target, method=method)
        return None if path is None else cls(method, path, host, tuple(headers))

    def header(self, name: str) -> str | None:
        """Every value of a header joined with ',' (Envoy compares that), None if absent.

        Names are case-insensitive; `:method`, `:path`, `:authority` (alias `host`) are the
        request's own fields, as in Envoy's header map.
        """
        name = name.lower()
        if name == ":method":
            return self.method
        if name == ":path":
            return self.path
        if name in (":authority", "host") and self.host is not None:
            return self.host
        if name == ":authority":
            name = "host"
        values = [v for n, v in self.headers if n.lower() == name]
        return ",".join(values) if values else None


@dataclass(frozen=True)
class HeaderEdit:
    """A change the proxy must make to the request before forwarding it."""
    action: str  # "add" (append a value) | "delete" (all values) | "replace" (all values by one)
    name: str
    value: str = ""


@dataclass(frozen=True)
class HeaderLog:
    """A headerMatch with a mismatch action that did not match (Cilium logs these)."""
    name: str
    value: str  # the value required; "" when only presence was required
    action: str  # LOG | ADD | DELETE | REPLACE


@dataclass(frozen=True)
class MatchResult:
    allowed: bool
    rule_index: int | None = None  # the first rule that matched (match_any), for `trace`
    header_edits: tuple[HeaderEdit, ...] = ()
    logs: tuple[HeaderLog, ...] = ()
    matched: tuple[int, ...] = ()  # match_any: every rule that matched (all evaluated) or the first


def apply_edits(request: HTTPRequest, edits: Iterable[HeaderEdit]) -> HTTPRequest:
    """The request with header edits applied (a `host` edit changes the authority)."""
    for edit in edits:
        lname = edit.name.lower()
        kept = tuple(h for h in request.headers if h[0].lower() != lname)
        if lname in (":authority", "host"):  # one authority: Envoy's `host` is `:authority`
            current = request.header("host")
            host = (None if edit.action == "delete" else edit.value if edit.action == "replace"
                    or current is None else f"{current},{edit.value}")
            request = replace(request, host=host, headers=kept)
        elif edit.action == "add":
            request = replace(request, headers=request.headers + ((edit.name, edit.value),))
        elif edit.action == "delete":
            request = replace(request, headers=kept)
        else:
            request = replace(request, headers=kept + ((edit.name, edit.value),))
    return request


# --- rules ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Required:
    name: str
    value: str | None  # None: presence only

    def ok(self, request: HTTPRequest) -> bool:
        got = request.header(self.name)
        return got is not None if self.value is None else got == self.value


@dataclass(frozen=True)
class _Action:
    name: str
    value: str  # "" means presence
    action: str  # LOG | ADD | DELETE | REPLACE


@dataclass(frozen=True)
class HTTPRuleMatcher:
    """One compiled PortRuleHTTP. The regexes are RE2, full match, case-sensitive."""
    method: str = ""
    path: str = ""
    host: str = ""
    required: tuple[_Required, ...] = ()
    actions: tuple[_Action, ...] = ()
    never: bool = False  # a secret-backed headerMatch without a value: never matches
    rule: PortRuleHTTP | None = field(default=None, compare=False, repr=False)

    def _base_matches(self, request: HTTPRequest) -> bool:
        if self.never:
            return False
        for regex, value in ((self.method, request.method), (self.path, request.path),
                             (self.host, request.header(":authority"))):
            if regex and (value is None or _regex(regex).fullmatch(value) is None):
                return False
        return all(r.ok(request) for r in self.required)

    def match(self, request: HTTPRequest) -> MatchResult:
        """Whether this rule allows the request, with the edits/logs of its header actions."""
        if not self._base_matches(request):
            return MatchResult(False)
        edits: list[HeaderEdit] = []
        logs: list[HeaderLog] = []
        for a in self.actions:  # in order: each edit is visible to the next check, as in Envoy
            got = request.header(a.name)
            if got is not None and (not a.value or got == a.value):
                continue
            logs.append(HeaderLog(a.name, a.value, a.action))
            edit = None
            if a.action == "ADD":
                edit = HeaderEdit("add", a.name, a.value)
            elif a.action == "REPLACE":
                edit = HeaderEdit("replace", a.name, a.value)
            elif a.action == "DELETE" and got is not None:
                edit = HeaderEdit("delete", a.name)
            if edit:
                edits.append(edit)
                request = apply_edits(request, [edit])
        return MatchResult(True, None, tuple(edits), tuple(logs))

    def matches(self, request: HTTPRequest) -> bool:
        return self.match(request).allowed


def _compile_regex(what: str, pattern: str) -> str:
    error = validate_regex(pattern) if pattern else None
    if error:
        raise HTTPRuleError(f"invalid {what} regex {pattern!r}: {error}")
    return pattern


def compile_rule(rule: PortRuleHTTP) -> HTTPRuleMatcher:
    """Compile one PortRuleHTTP the way Cilium translates it for Envoy; HTTPRuleError if bad."""
    required: list[_Required] = []
    actions: list[_Action] = []
    never = False
    for text in rule.headers:
        # "Name" -> presence; "Name: value" / "Name value" -> exact value (split at the first
        # space, trailing ':' trimmed from the name). Without a space the whole string is the
        # name, colon included, exactly as Cilium does.
        name, sep, value = text.partition(" ")
        name = name.rstrip(":") if sep else name
        if not name:
            raise HTTPRuleError(f"invalid header {text!r}: empty name")
        required.append(_Required(name.lower(), value if sep else None))
    for hm in rule.header_matches:
        if not hm.name:
            raise HTTPRuleError("Header name missing")
        if hm.mismatch not in MISMATCH_ACTIONS:
            raise HTTPRuleError(f"Invalid header action: {hm.mismatch}")
        if hm.secret is not None and not hm.value:
            never = True  # no secret store: Cilium's "missing secret" path, the rule never matches
        elif not hm.mismatch:
            required.append(_Required(hm.name.lower(), hm.value or None))
        else:
            actions.append(_Action(hm.name, hm.value, hm.mismatch))
    return HTTPRuleMatcher(
        method=_compile_regex("method", rule.method), path=_compile_regex("path", rule.path),
        host=_compile_regex("host", rule.host), required=tuple(required), actions=tuple(actions),
        never=never, rule=rule)


def compile_rules(rules: Iterable[PortRuleHTTP]) -> tuple[HTTPRuleMatcher, ...]:
    return tuple(compile_rule(r) for r in rules)


def match_any(rules: Sequence[HTTPRuleMatcher], request: HTTPRequest) -> MatchResult:
    """Allowed if at least one rule matches; `rule_index` is the first that did.

    An empty list allows everything (no L7 constraint). If any rule has header actions, every
    rule is evaluated (Cilium disables short-circuiting) and the edits of all matching rules
    are collected, each rule seeing the edits of those before it.
    """
    if not rules:
        return MatchResult(True)
    exhaustive = any(r.actions for r in rules)
    matched: list[int] = []
    edits: list[HeaderEdit] = []
    logs: list[HeaderLog] = []
    for i, rule in enumerate(rules):
        result = rule.match(request)
        if not result.allowed:
            continue
        matched.append(i)
        if not exhaustive:
            break
        edits += result.header_edits
        logs += result.logs
        request = apply_edits(request, result.header_edits)
    first = matched[0] if matched else None
    return MatchResult(first is not None, first, tuple(edits), tuple(logs), tuple(matched))


# --- path normalisation ---------------------------------------------------------------------

# Envoy's path canonicaliser (Chromium's url_canon_path.cc) classifies each byte.
_SPECIAL, _ESCAPE, _UNESCAPE, _INVALID = 1, 2 | 1, 4, 8 | 1


def _char_flags() -> list[int]:
    flags = [_ESCAPE] * 256  # control characters and every byte >= 0x80 get %XX
    flags[0] = _INVALID
    for c in b"!$&'()*+,/:;=@[]":
        flags[c] = 0  # copied as they are, escaped or not
    for c in b"-_~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz":
        flags[c] = _UNESCAPE  # RFC 3986 unreserved: %XX of these is decoded
    flags[ord(".")] = _SPECIAL
    return flags


_FLAGS = _char_flags()
_HEX = b"0123456789abcdefABCDEF"
_ESCAPED_SLASH = re.compile(rb"%(2[fF]|5[cC])")
_SLASH, _BACKSLASH, _PERCENT, _DOT = ord("/"), ord("\\"), ord("%"), ord(".")


def _decode(spec: bytes | bytearray, i: int) -> int | None:
    """The byte `%XX` at `i` stands for, or None if it is not a valid escape."""
    if i + 3 > len(spec) or spec[i + 1] not in _HEX or spec[i + 2] not in _HEX:
        return None
    return int(spec[i + 1:i + 3], 16)


def _dot_len(spec: bytes, i: int) -> int:
    if spec[i] == _DOT:
        return 1
    if spec[i:i + 3] in (b"%2e", b"%2E"):
        return 3
    return 0


def _after_dot(spec: bytes, j: int) -> tuple[str, int]:
    """What a dot segment means given what follows it: ("cur"|"up"|"name", bytes consumed)."""
    if j == len(spec):
        return "cur", 0
    if spec[j] in (_SLASH, _BACKSLASH):
        return "cur", 1
    second = _dot_len(spec, j)
    if second:
        k = j + second
        if k == len(spec):
            return "up", second
        if spec[k] in (_SLASH, _BACKSLASH):
            return "up", second + 1
    return "name", 0


def _nested_escape(spec: bytes, nxt: int, bad: int, out: bytearray) -> None:
    """Stop `%%30%30`-style input from turning into a valid escape (`%00`) once decoded."""
    length, last = len(out), out[-1]
    append_next = bad == length - 2
    if append_next:
        if nxt == len(spec) or spec[nxt] >= 0x80:
            return
        out.append(spec[nxt])
    if _decode(out, bad) is not None:
        if not append_next:
            out.append(out[bad + 1])
        out[bad + 1:bad + 3] = b"25"
        out.append(last)
    elif append_next:
        del out[length:]


def _canonicalize(spec: bytes) -> bytes | None:
    """RFC 3986 path canonicalisation as Envoy does it; None where Envoy rejects (`%00`)."""
    out = bytearray()
    bad, i = -10, 0  # bad: where the last '%' that began no valid escape went in `out`
    while i < len(spec):
        ch = spec[i]
        flags = _FLAGS[ch]
        dot = _dot_len(spec, i) if flags & _SPECIAL else 0
        if not flags & _SPECIAL:
            out.append(ch)
        elif dot:
            if out and out[-1] == _SLASH:
                kind, used = _after_dot(spec, i + dot)
                if kind == "name":
                    out.append(_DOT)
                elif kind == "up" and len(out) > 1:  # back up to the previous slash, not past /
                    del out[out.rindex(b"/", 0, len(out) - 1) + 1:]
                i += used
            else:
                out.append(_DOT)
            i += dot - 1
        elif ch == _BACKSLASH:
            out.append(_SLASH)
        elif ch == _PERCENT:
            value = _decode(spec, i)
            if value is None:
                bad = len(out)
                out.append(_PERCENT)
            elif _FLAGS[value] & _UNESCAPE:
                out.append(value)
                i += 2
                if bad >= len(out) - 3:
                    _nested_escape(spec, i + 1, bad, out)
            else:
                if _FLAGS[value] & 8:
                    return None  # %00
                out += spec[i:i + 3]  # kept as written, hex case included (as Envoy does)
                i += 2
        elif flags & 8:
            return None
        else:
            out += b"%%%02X" % ch
        i += 1
    return bytes(out)


def _merge_slashes(path: bytes) -> bytes:
    """Envoy's merge_slashes: keep a leading and a trailing slash, join the non-empty segments."""
    if b"//" not in path:
        return path
    inner = b"/".join(s for s in path.split(b"/") if s)
    return (b"/" if path.startswith(b"/") else b"") + inner + (b"/" if path.endswith(b"/") else b"")


def normalize_path(raw_path: str | bytes, method: str | None = None) -> str | None:
    """The request-target as Cilium's Envoy normalises it, query kept as sent; None -> 400.

    Steps, in Envoy's order: `%2F`/`%5C` (any case) are unescaped (Cilium configures
    UNESCAPE_AND_REDIRECT: Envoy redirects the client to the result; we match the result
    directly, which is the verdict the redirected request would get, and the proxy forwards
    it); RFC 3986 canonicalisation (dot segments, `%XX` of unreserved characters decoded, other
    escapes kept as written, `\\` from `%5C` treated as `/`, disallowed bytes escaped as `%XX`);
    then consecutive slashes merged. Only the part before `?` is touched.

    None for what cannot be canonicalised safely: NUL or any control byte, space, `#`, a raw
    backslash (HTTP codecs refuse these in a request-target), `%00` in the path, anything not in
    origin form, and `*` unless the method is OPTIONS. Pass bytes if you have them; a str is
    taken as UTF-8 with surrogate escapes (mitmproxy's decoding). The query must be UTF-8.
    """
    try:
        raw = raw_path if isinstance(raw_path, bytes) else raw_path.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return None
    if raw == b"*":
        return "*" if method == "OPTIONS" else None
    path, sep, query = raw.partition(b"?")
    if not path.startswith(b"/") or b"\\" in path or re.search(rb"[\x00-\x20\x7f#]", raw):
        return None
    path = _ESCAPED_SLASH.sub(lambda m: b"/" if m[1] in (b"2f", b"2F") else b"\\", path)
    canonical = _canonicalize(path)
    if canonical is None:
        return None
    try:
        return (_merge_slashes(canonical) + sep + query).decode("utf-8")
    except UnicodeDecodeError:
        return None
