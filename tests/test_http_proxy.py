"""The HTTP proxy's sans-IO core against the corpus in tests/data/http_corpus/*.yaml.

Each case scripts one client connection through `ProxyConnection` (client bytes, upstream
bytes, EOFs) with the real engine behind it (EngineOracle, Star Wars policy plus the corpus
extras, deathstar-1's ingress side, the peer tiefighter unless a case says otherwise) and
states what must come out: the exact bytes forwarded upstream (or bytes that must never be), the exact bytes the client gets,
the flows (verdict, code) in order, and how the connection ends. Every case runs twice: with
each step fed whole and fed one byte at a time; the outcome must be the same.
"""
from __future__ import annotations

import random
from pathlib import Path

import httptools
import pytest
import yaml

from proxy.agent.oracle import EngineOracle
from proxy.l7.http import conn as http
from proxy.policy.endpoint import load_endpoints_file
from proxy.policy.engine import Engine
from proxy.policy.load import load_paths

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "tests" / "data" / "http_corpus"
POLICIES = [ROOT / "policies" / "starwars" / "l3-l4-l7.yaml", CORPUS / "policies" / "extras.yaml"]
ENDPOINTS = ROOT / "policies" / "starwars" / "endpoints.yaml"
PEERS = {"tiefighter": "10.200.0.21", "xwing": "10.200.0.31", "mediabot": "10.200.0.41"}


def build_oracle() -> EngineOracle:
    result = load_paths([str(p) for p in POLICIES])
    assert result.valid, [str(e) for e in result.errors]
    endpoints, services = load_endpoints_file(str(ENDPOINTS))
    return EngineOracle(Engine(result.policies, endpoints, services), "deathstar-1")


ORACLE = build_oracle()


def _bytes(value) -> bytes:
    """A corpus string (latin-1, YAML escapes) or a list of parts, `{repeat, times}` allowed."""
    if value is None:
        return b""
    if isinstance(value, str):
        return value.encode("latin-1")
    out = b""
    for part in value:
        out += part["repeat"].encode("latin-1") * part["times"] if isinstance(part, dict) \
            else part.encode("latin-1")
    return out


def load_cases():
    for path in sorted(CORPUS.glob("*.yaml")):
        doc = yaml.safe_load(path.read_text())
        for case in doc["cases"]:
            yield path.stem, case


CASES = list(load_cases())


def steps_of(case):
    if "steps" in case:
        return case["steps"]
    steps = [{"client": case["client"]}]
    for response in case.get("upstream", []):
        steps.append({"upstream": response})
    return steps


def run_case(case, bytewise: bool):
    peer = PEERS[case.get("peer", "tiefighter")]
    port = case.get("port", 80)
    checked = []

    def check(request):
        checked.append(request)
        return ORACLE.http_verdict("ingress", peer, port, request)

    core = http.ProxyConnection(check, authority="10.200.0.11", max_pipeline=case.get("max_pipeline", 64))
    commands = []
    for step in steps_of(case):
        (kind, value), = ((k, v) for k, v in step.items() if k != "then")
        if kind in ("client", "upstream"):
            data = _bytes(value)
            feed = core.client_data if kind == "client" else core.upstream_data
            pieces = [data[i:i + 1] for i in range(len(data))] if bytewise else [data]
            for piece in pieces:
                if core.tunnel:  # what the server does after a Tunnel command: relay raw
                    relay = http.SendUpstream if kind == "client" else http.SendClient
                    commands.append(relay(piece))
                else:
                    commands += feed(piece)
        elif kind == "client_eof":
            commands += core.client_eof()
        elif kind == "upstream_eof":
            commands += core.upstream_eof()
        elif kind == "upstream_failed":
            commands += core.upstream_failed()
        else:
            raise AssertionError(f"unknown step {kind}")
        then = step.get("then")
        if then is not None:  # cumulative state after this step
            forwarded, to_client, flows, _, _ = summary(commands)
            if "forwarded" in then:
                assert forwarded == _bytes(then["forwarded"]), f"forwarded after {kind} step"
            if "to_client" in then:
                assert to_client == _bytes(then["to_client"]), f"sent to the client after {kind} step"
            if "flows" in then:
                assert [[f["verdict"], f["code"]] for f in flows] == then["flows"]
    return core, commands, checked


def summary(commands):
    forwarded = b"".join(c.data for c in commands if isinstance(c, http.SendUpstream))
    to_client = b"".join(c.data for c in commands if isinstance(c, http.SendClient))
    flows = [c.record for c in commands if isinstance(c, http.Flow)]
    closes = [c for c in commands if isinstance(c, http.Close)]
    tunnels = [c for c in commands if isinstance(c, http.Tunnel)]
    for t in tunnels:
        forwarded += t.to_upstream
        to_client += t.to_client
    return forwarded, to_client, flows, closes, tunnels


@pytest.mark.parametrize("bytewise", [False, True], ids=["whole", "bytewise"])
@pytest.mark.parametrize("case", [c for _, c in CASES], ids=[f"{f}:{c['name']}" for f, c in CASES])
def test_corpus(case, bytewise):
    _, commands, checked = run_case(case, bytewise)
    forwarded, to_client, flows, closes, tunnels = summary(commands)
    expect = case["expect"]
    if "forwarded" in expect:
        assert forwarded == _bytes(expect["forwarded"]), "bytes forwarded upstream"
    if "not_forwarded" in expect:
        assert _bytes(expect["not_forwarded"]) not in forwarded
    if "to_client" in expect:
        assert to_client == _bytes(expect["to_client"]), "bytes sent to the client"
    if "flows" in expect:
        assert [[f["verdict"], f["code"]] for f in flows] == expect["flows"]
    if "reason" in expect:
        assert any(expect["reason"] in (f["reason"] or "") for f in flows) or \
            any(expect["reason"] in c.reason for c in closes), (flows, closes)
    if "matched" in expect:  # what the matcher saw: [method, path, host]
        assert [[r.method, r.path, r.host] for r in checked] == expect["matched"]
    if "url" in expect:
        assert [f["url"] for f in flows] == expect["url"]
    end = expect.get("close")
    if end is None:
        assert not closes, f"connection closed: {closes}"
    else:
        assert len(closes) == 1 and closes[0].abort == (end == "abort"), closes
    assert bool(tunnels) == bool(expect.get("tunnel", False))


def test_corpus_size():
    assert len(CASES) >= 80


def test_denied_reply_is_ciliums_bytes():
    assert http.DENIED == (b"HTTP/1.1 403 Forbidden\r\ncontent-length: 15\r\n"
                           b"content-type: text/plain\r\n\r\nAccess denied\r\n")


# --- never crash, never forward what was not checked ------------------------------------------

def _mutations(rng: random.Random, seeds: list[tuple[bytes, int]], n: int):
    alphabet = [b"\r\n", b"\r", b"\n", b" ", b"\t", b"\x00", b":", b"0", b"chunked", b"%2e",
                b"Content-Length: 5\r\n", b"Transfer-Encoding: chunked\r\n", b"\xff", b"/../",
                b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", b"Upgrade: websocket\r\nConnection: upgrade\r\n"]
    for _ in range(n):
        seed, port = rng.choice(seeds)
        data = bytearray(seed)
        for _ in range(rng.randint(1, 3)):
            op = rng.random()
            i = rng.randint(0, len(data))
            if op < 0.4:
                data[i:i] = rng.choice(alphabet)
            elif op < 0.7 and data:
                del data[i:i + rng.randint(1, 4)]
            elif data:
                data[min(i, len(data) - 1)] = rng.randint(0, 255)
        yield bytes(data), port


class _Count:
    def __init__(self):
        self.begun = 0

    def on_message_begin(self):
        self.begun += 1


def test_mutated_inputs_never_crash_and_only_checked_requests_go_upstream():
    seeds = [(_bytes(c["client"]), c.get("port", 80)) for _, c in CASES if "client" in c]
    rng = random.Random(1234)
    runs_forwarding = 0
    for data, port in _mutations(rng, seeds, 3000):
        for split in (len(data) or 1, 7):
            allowed = []

            def check(request, allowed=allowed, port=port):
                verdict = ORACLE.http_verdict("ingress", PEERS["tiefighter"], port, request)
                if verdict.allowed:
                    allowed.append(request)
                return verdict

            core = http.ProxyConnection(check)
            commands = []
            for i in range(0, len(data), split):
                commands += core.client_data(data[i:i + split])
            commands += core.client_eof()
            forwarded = b"".join(c.data for c in commands if isinstance(c, http.SendUpstream))
            runs_forwarding += bool(forwarded)
            counter = _Count()
            parser = httptools.HttpRequestParser(counter)
            try:
                parser.feed_data(forwarded)  # what went upstream is well-formed HTTP/1.1 ...
            except httptools.HttpParserUpgrade:
                pass
            # ... and holds no request that was not checked and allowed
            assert counter.begun <= len(allowed), (data, forwarded)
    assert runs_forwarding > 300  # enough mutations stay valid requests for this to mean something


def test_mutated_responses_never_crash():
    cases = [c for _, c in CASES if "client" in c and c.get("upstream")]
    rng = random.Random(99)
    for _ in range(1500):
        case = rng.choice(cases)
        (response, _port), = _mutations(rng, [(_bytes(rng.choice(case["upstream"])), 0)], 1)
        port = case.get("port", 80)
        core = http.ProxyConnection(lambda r, p=port: ORACLE.http_verdict(
            "ingress", PEERS["tiefighter"], p, r))
        commands = core.client_data(_bytes(case["client"]))
        for i in range(0, len(response), 5):
            commands += core.upstream_data(response[i:i + 5])
        commands += core.upstream_eof()
        # after the upstream's EOF nothing may still wait for it: answered, closed or tunnelled
        assert core.closed or core.tunnel or not core._queue_upstream(), (case["name"], response)


# --- pieces -----------------------------------------------------------------------------------

def test_plain_target_shortcut_agrees_with_normalize_path():
    """conn skips httpmatch.normalize_path for targets it would return unchanged; check that
    claim over many generated targets (plain ones and near misses)."""
    from proxy.policy.httpmatch import normalize_path
    rng = random.Random(7)
    pieces = ["a", "Z9", "-", ".", "..", "_", "~", "!", "$", "&", "'", "(", ")", "*", "+", ",",
              ";", "=", ":", "@", "[", "]", "%2e", "%41", "%", "/", "//", "\\", "\"", "{", "^",
              "?", "?q=1", "#", " ", "\x7f", "é"]
    plain = 0
    for _ in range(20000):
        target = "/" + "".join(rng.choice(pieces) for _ in range(rng.randint(0, 6)))
        raw = target.encode("utf-8")
        if http._PLAIN_TARGET.fullmatch(raw) is not None:
            plain += 1
            assert normalize_path(raw, method="GET") == target, target
    assert plain > 1000


def _read_all(reader: http.RequestReader, data: bytes) -> list:
    reader.receive_data(data)
    events = []
    while len(events) < 200:
        ev = reader.next_event()
        events.append(ev)
        if ev is http.NEED_DATA or ev is http.PAUSED or isinstance(ev, http.ProtocolError):
            break
    return events


def test_simple_heads_are_read_as_the_full_way_reads_them():
    """RequestReader reads heads of the commonest shape a shorter way (`_simple_head`); over the
    corpus's client bytes, their mutations and a few hand-made heads, the events must be the
    ones the full way (`_full_head` alone) gives."""
    seeds = [(_bytes(c["client"]), 80) for _, c in CASES if "client" in c]
    heads = [b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", b"GET /x HTTP/1.0\r\n\r\n",
             b"GET /x HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
             b"GET /x HTTP/1.1\r\nhost:a\r\nConnection: Keep-Alive, close\r\n\r\n",
             b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\n\r\n",
             b"GET /x HTTP/1.1\r\nHost: a\r\nHOST: b\r\n\r\n",
             b"DELETE /a/.b/c%41?q=/../ HTTP/1.1\r\nHost: a\r\nX:  v  w \t\r\nY:\r\n\r\n",
             b"get /x HTTP/1.1\r\nHost: a\r\n\r\n", b"POST /x HTTP/1.1\r\nHost: a\r\n\r\n",
             b"GET /x HTTP/1.1\r\nHost: a\r\n\r\nGET /.. HTTP/1.1\r\nHost: a\r\n\r\n"]
    rng = random.Random(4321)
    inputs = [d for d, _ in seeds] + heads + [d for d, _ in _mutations(rng, seeds, 4000)]
    simple = 0
    for data in inputs:
        fast, full = http.RequestReader(max_headers=8), http.RequestReader(max_headers=8)
        full._simple_head = lambda head, m: None
        shortcut = fast._simple_head

        def counting(head, m):
            nonlocal simple
            ev = shortcut(head, m)
            simple += ev is not None
            return ev

        fast._simple_head = counting
        assert _read_all(fast, data) == _read_all(full, data), data
    assert simple > 300  # enough heads took the short way for the comparison to mean something


def test_simple_response_heads_are_read_as_llhttp_reads_them():
    """ResponseReader reads the framing of plain response heads without llhttp
    (`_simple_fields`); over the corpus's responses, their mutations and a few hand-made heads,
    the events must be the ones the full way (`_full_fields`, llhttp) gives."""
    seeds = [(_bytes(r), 0) for _, c in CASES for r in c.get("upstream", [])]
    heads = [b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
             b"HTTP/1.0 200 OK\r\nconnection: Keep-Alive\r\ncontent-length: 0\r\n\r\n",
             b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nok",
             b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n", b"HTTP/1.1 204 \r\n\r\n",
             b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
             b"HTTP/1.1 101 Switching\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
             b"HTTP/1.1 999 Odd\r\nX:  a b \t\r\nContent-Length: 1\r\n\r\nab",
             b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nrest"]
    rng = random.Random(2468)
    inputs = [d for d, _ in seeds] + heads + [d for d, _ in _mutations(rng, seeds, 3000)]
    simple = 0
    for data in inputs:
        for method, upgrade in (("GET", False), ("HEAD", False), ("GET", True), ("CONNECT", True)):
            fast, full = http.ResponseReader(), http.ResponseReader()
            full._simple_fields = lambda m: None
            shortcut = fast._simple_fields

            def counting(m):
                nonlocal simple
                found = shortcut(m)
                simple += found is not None
                return found

            fast._simple_fields = counting
            events = []
            for reader in (fast, full):
                reader.receive_data(data)
                reader.receive_eof()
                seen = []
                while len(seen) < 50:
                    ev = reader.next_event(method, upgrade)
                    seen.append(ev)
                    if ev is http.NEED_DATA or ev is http.PAUSED or isinstance(ev, http.ProtocolError):
                        break
                events.append(seen)
            assert events[0] == events[1], (data, method, upgrade)
    assert simple > 300  # enough heads took the short way for the comparison to mean something


def test_flows_keep_client_chosen_texts_clipped_and_forward_them_whole():
    """The observer keeps thousands of flows: a 50 KB path each would be gigabytes."""
    from proxy.l7.oracle import L7Result
    core = http.ProxyConnection(lambda r: L7Result(True), authority="deathstar")
    target = "/public?" + "a" * 50000
    head = f"GET {target} HTTP/1.1\r\nHost: {'h' * 5000}\r\n\r\n".encode()
    out = core.client_data(head) + core.upstream_data(b"HTTP/1.1 204 No Content\r\n\r\n")
    assert b"".join(c.data for c in out if isinstance(c, http.SendUpstream)) == head
    (flow,) = [c for c in out if isinstance(c, http.Flow)]
    limit = http.MAX_FLOW_TEXT
    assert flow.path == target[:limit] + f"...({len(target) - limit} more)" == flow.target
    assert flow.host == "h" * limit + "...(904 more)"
    assert len(flow.record["url"]) < 3 * limit
    short = http.ProxyConnection(lambda r: L7Result(True))
    out = short.client_data(b"GET /p HTTP/1.1\r\nHost: d\r\n\r\n") + short.upstream_data(b"HTTP/1.1 204 No Content\r\n\r\n")
    (flow,) = [c for c in out if isinstance(c, http.Flow)]
    assert (flow.host, flow.path, flow.target) == ("d", "/p", "/p")


def test_header_edits_from_the_verdict_are_applied_to_the_forwarded_head():
    from proxy.l7.oracle import L7Result
    from proxy.policy.httpmatch import HeaderEdit
    edits = (HeaderEdit("add", "X-Added", "1"), HeaderEdit("delete", "X-Gone"),
             HeaderEdit("replace", "X-Token", "new"), HeaderEdit("replace", ":authority", "api"))
    core = http.ProxyConnection(lambda r: L7Result(True, header_edits=edits))
    commands = core.client_data(b"GET /x HTTP/1.1\r\nHost: web\r\nX-Gone: a\r\nx-token: old\r\n"
                                b"X-Gone: b\r\nAccept: */*\r\n\r\n")
    (sent,) = [c.data for c in commands if isinstance(c, http.SendUpstream)]
    assert sent == (b"GET /x HTTP/1.1\r\nAccept: */*\r\nX-Added: 1\r\nX-Token: new\r\n"
                    b"host: api\r\n\r\n")


def test_oracle_failure_denies():
    def broken(request):
        raise RuntimeError("engine exploded")

    core = http.ProxyConnection(broken)
    commands = core.client_data(b"GET /x HTTP/1.1\r\nHost: web\r\n\r\n")
    assert b"".join(c.data for c in commands if isinstance(c, http.SendClient)) == http.DENIED
    (flow,) = [c for c in commands if isinstance(c, http.Flow)]
    assert flow.record["reason"].startswith("policy lookup failed: RuntimeError")


def test_flow_record_fields():
    core = http.ProxyConnection(lambda r: ORACLE.http_verdict("ingress", PEERS["tiefighter"], 80, r),
                                authority="10.200.0.11")
    core.client_data(b"POST //v1/request-landing HTTP/1.1\r\nHost: deathstar\r\n\r\n")
    commands = core.upstream_data(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    (flow,) = [c for c in commands if isinstance(c, http.Flow)]
    rec = flow.record
    assert rec["method"] == "POST" and rec["protocol"] == "HTTP/1.1" and rec["code"] == 200
    assert rec["url"] == "http://deathstar/v1/request-landing"
    assert rec["target"] == "//v1/request-landing" and rec["verdict"] == "FORWARDED"
    assert rec["policies"] == ({"kind": "CiliumNetworkPolicy", "namespace": "default", "name": "rule1"},)
    assert rec["latency_ms"] >= 0


def test_events_tell_the_observer_what_their_dicts_would():
    """An HTTPEvent is read by the observer through its attributes, never built; they must be
    what the observe functions read from its dict, for every flow of the whole corpus."""
    from proxy.l7.http.server import HTTPEvent
    from proxy.observe.flow import event_time_ns, http_latency_ns, proxy_event_kind, proxy_flow_count

    seen = set()
    for _, case in CASES:
        _, commands, _ = run_case(case, bytewise=False)
        for flow in (c for c in commands if isinstance(c, http.Flow)):
            for direction in ("ingress", "egress"):
                ev = HTTPEvent(flow, 1_700_000_000_123_456_789, direction, ("10.200.0.21", 40000),
                               ("10.200.0.11", 80))
                d = dict(ev)
                assert ev.kind == proxy_event_kind(d), case["name"]
                assert ev.flow_count == proxy_flow_count(d)
                assert ev.http_latency_ns == http_latency_ns(d)
                assert ev.time_ns == event_time_ns(d, None)
                assert (ev.src_ip, ev.dst_ip) == (d["src_ip"], d["dst_ip"])
                seen.add((d["verdict"], d["code"], d["protocol"]))
    assert {v for v, _, _ in seen} == {"FORWARDED", "DROPPED"}
    assert {c for _, c, _ in seen} >= {200, 403, 400, 502, 503, None}
    assert {p for _, _, p in seen} >= {"HTTP/1.1", "HTTP/1.0", "HTTP/2"}
