"""The DNS proxy chain without sockets: parse → policy → forward → learn → release.

The cases live in tests/data/dns_corpus/*.yaml (the adversarial corpus: names, escapes, `*.` and
`**.`, other resolvers, CNAME chains, spoofed and malformed messages, TCP framing); each test
below is a loop over one file. Policy decisions come from the real engine (EngineOracle over real
policy files). The last tests drive `Server.answer` — the whole chain as the sockets run it —
with a scripted upstream exchange instead of a network.
"""
from __future__ import annotations

import asyncio
import random
import struct
import time
from pathlib import Path

import pytest
import yaml
from dnslib import (AAAA, CLASS, CNAME, NS, QTYPE, RCODE, RD, RR, TXT, A, DNSHeader, DNSLabel,
                    DNSQuestion, DNSRecord)

from proxy.agent.oracle import EngineOracle
from proxy.l7.dns import wire
from proxy.l7.dns.chain import (FORMERR, NOTIMP, REFUSED, SERVFAIL, Destination, DNSProtocolError,
                                Mismatch, Outstanding, Query, TCPFramer, check_policy, learn,
                                parse_query, refusal, release)
from proxy.l7.dns.server import Server, UpstreamFailed
from proxy.policy.endpoint import load_endpoints_file
from proxy.policy.engine import Engine
from proxy.policy.load import load_paths

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "tests" / "data" / "dns_corpus"
UPSTREAM_ID = 0xBEEF
KUBE_DNS = Destination("10.200.0.53", 53, "UDP")
CLIENT = ("10.200.0.41", 40000)
NXDOMAIN = 3


def corpus(name: str) -> dict:
    with open(CORPUS / name, encoding="utf-8") as f:
        return yaml.safe_load(f)


def cases(name: str):
    return [pytest.param(c, id=c["name"]) for c in corpus(name)["cases"]]


# -- building messages from the corpus' compact form ----------------------------------------------
def name_to_labels(text: str) -> tuple[bytes, ...]:
    """Presentation form → wire labels: `\\.` is a dot inside a label, `\\DDD` a byte."""
    if text in ("", "."):
        return ()
    labels, current, i = [], bytearray(), 0
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            if text[i + 1:i + 4].isdigit() and len(text[i + 1:i + 4]) == 3:
                current.append(int(text[i + 1:i + 4]))
                i += 4
            else:
                current += text[i + 1].encode("latin-1")
                i += 2
            continue
        if ch == ".":
            labels.append(bytes(current))
            current = bytearray()
        else:
            current += ch.encode("latin-1")
        i += 1
    if current:
        labels.append(bytes(current))
    return tuple(labels)


def label(text: str) -> DNSLabel:
    return DNSLabel(list(name_to_labels(text)))


def rtype(value) -> int:
    return value if isinstance(value, int) else getattr(QTYPE, value)


def rclass(value) -> int:
    return value if isinstance(value, int) else getattr(CLASS, value)


def hexbytes(text: str) -> bytes:
    return bytes.fromhex("".join(str(text).split()))


def record(spec) -> RR:
    name, kind, ttl, data, *rest = spec
    t = rtype(kind)
    klass = rclass(rest[0]) if rest else 1
    if isinstance(data, str) and data.startswith("hex:"):
        rdata = RD(hexbytes(data[4:]))
    elif t == QTYPE.A:
        rdata = A(data)
    elif t == QTYPE.AAAA:
        rdata = AAAA(data)
    elif t == QTYPE.CNAME:
        rdata = CNAME(label(data))
    elif t == QTYPE.NS:
        rdata = NS(label(data))
    elif t == QTYPE.TXT:
        rdata = TXT(data)
    else:
        raise ValueError(f"no builder for {kind}")
    return RR(label(name), t, klass, ttl, rdata)


def finish(data: bytes, spec: dict) -> bytes:
    cut = spec.get("truncate")
    if cut is not None:
        data = data[:cut]
    return data + hexbytes(spec.get("append_hex", ""))


def set_counts(data: bytes, counts: dict | None) -> bytes:
    if not counts:
        return data
    out = bytearray(data)
    for i, key in enumerate(("qd", "an", "ns", "ar")):
        if key in counts:
            out[4 + 2 * i:6 + 2 * i] = counts[key].to_bytes(2, "big")
    return bytes(out)


def encode_question(spec: dict) -> bytes:
    """Uncompressed, by hand, so the corpus can also hold names dnslib would refuse to build."""
    name = b"".join(bytes([len(lb)]) + lb for lb in name_to_labels(spec.get("name", "a.com"))) + b"\0"
    return name + struct.pack("!HH", rtype(spec.get("type", "A")), rclass(spec.get("class", "IN")))


OPT_RECORD = bytes.fromhex("00 0029 04d0 00000000 0000".replace(" ", ""))  # EDNS0, 1232 bytes


def build_query(spec: dict) -> bytes:
    if "hex" in spec:
        return finish(hexbytes(spec["hex"]), spec)
    questions = [spec] + spec.get("extra_questions", [])
    additional = spec.get("additional", [])
    assert all(a == "OPT" for a in additional)
    flags = (spec.get("qr", 0) << 15) | (spec.get("opcode", 0) << 11) | (spec.get("rd", 1) << 8)
    data = struct.pack("!HHHHHH", spec.get("id", 0x1234), flags, len(questions), 0, 0, len(additional))
    data += b"".join(encode_question(q) for q in questions) + OPT_RECORD * len(additional)
    return finish(set_counts(data, spec.get("counts")), spec)


def build_answer(spec: dict, query: dict) -> bytes:
    if "hex" in spec:
        return finish(hexbytes(spec["hex"]), spec)
    header = DNSHeader(id=spec.get("id", UPSTREAM_ID), qr=spec.get("qr", 1), aa=1, rd=1, ra=1,
                       tc=spec.get("tc", 0), rcode=getattr(RCODE, spec.get("rcode", "NOERROR")))
    if "questions" in spec:
        questions = spec["questions"]
    else:
        questions = [spec.get("question", query)]
    msg = DNSRecord(header, questions=[
        DNSQuestion(label(q.get("name", "a.com")), rtype(q.get("type", "A")), rclass(q.get("class", "IN")))
        for q in questions])
    for section, add in (("answers", msg.add_answer), ("authority", msg.add_auth),
                         ("additional", msg.add_ar)):
        for r in spec.get(section, []):
            add(record(r))
    return finish(msg.pack(), spec)


def address(text: str) -> tuple[str, int]:
    ip, port = text.rsplit(":", 1)
    return ip, int(port)


def make_oracle(policy_files, open_ips=None, endpoints="policies/dns/endpoints.yaml",
                endpoint="mediabot") -> EngineOracle:
    eps, svcs = load_endpoints_file(str(ROOT / endpoints))
    loaded = load_paths([str(ROOT / p) for p in policy_files])
    assert loaded.valid, loaded.errors
    engine = Engine(loaded.policies, eps, svcs, clock=time.monotonic)
    return EngineOracle(engine, endpoint, open_ips=open_ips)


# -- 1. parse -------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", cases("queries.yaml"))
def test_parse_query(case):
    data = build_query(case["query"])
    expect = case["expect"]
    if "qname" in expect:
        query = parse_query(data)
        assert query.qname == expect["qname"]
        # what is forwarded (a new ID) reads as the very question that was checked, whatever the ID
        for upstream_id in (0x0000, 0x3f3f, 0xc00c, 0xffff):
            sent = Outstanding().register("up", query, KUBE_DNS, upstream_id).wire
            assert parse_query(sent).question.key == query.question.key
        return
    with pytest.raises(DNSProtocolError) as info:
        parse_query(data)
    err = info.value
    if expect.get("drop"):
        assert (err.rcode, err.reply) == (None, None)
        return
    assert err.rcode == {"FORMERR": FORMERR, "NOTIMP": NOTIMP}[expect["rcode"]]
    reply = wire.parse(err.reply)
    sent = wire.parse_header(data)
    assert reply.header.id == sent.id, "the reply carries the query's ID"
    assert reply.header.qr and reply.header.rcode == err.rcode
    assert reply.header.opcode == sent.opcode
    assert (reply.header.ancount, reply.header.nscount, reply.header.arcount) == (0, 0, 0)


# -- 2. policy (and where step 3 sends what is allowed) -------------------------------------------
def policy_cases():
    return [pytest.param(group, case, id=f"{group['policies'][0].split('/')[-1]}: {case['name']}")
            for group in corpus("policy.yaml")["groups"] for case in group["cases"]]


_ORACLES: dict[tuple, EngineOracle] = {}


def group_oracle(group) -> EngineOracle:
    key = (tuple(group["policies"]), group["endpoints"], group["endpoint"])
    if key not in _ORACLES:
        _ORACLES[key] = make_oracle(group["policies"], endpoints=group["endpoints"],
                                    endpoint=group["endpoint"])
    return _ORACLES[key]


@pytest.mark.parametrize("group,case", policy_cases())
def test_policy(group, case):
    oracle = group_oracle(group)
    data = build_query(case["query"])
    query = parse_query(data)
    ip, port = address(case["server"])
    dest = Destination(ip, port, case.get("proto", "UDP"))
    verdict = check_policy(oracle, query, dest)
    if case["expect"] == "forward":
        assert verdict.allowed, verdict.reason
        pending = Outstanding().register("upstream", query, dest)
        assert pending.server == dest, "forwarded to the server the client asked"
        assert pending.wire[2:] == data[2:], "forwarded unchanged but for the ID"
        return
    assert case["expect"] == "REFUSED"
    assert not verdict.allowed
    reply = wire.parse(refusal(query))
    assert reply.header.id == query.id
    assert reply.header.qr and reply.header.rcode == REFUSED
    assert reply.header.flags & wire.RD == query.header.flags & wire.RD
    assert reply.questions == (query.question,), "the question is copied, case and all"
    assert reply.answers == () and (reply.header.nscount, reply.header.arcount) == (0, 0)


def test_names_are_presented_as_miekg_prints_them():
    """Plain labels are joined as they are; a label with a dot, a space, a special or a
    non-printable byte is escaped (`present` has a short way for names with nothing to escape)."""
    assert wire.present(()) == "."
    assert wire.present((b"w1", b"Bench", b"example")) == "w1.Bench.example."
    assert wire.present((b"~!-_", b"x")) == "~!-_.x."
    assert wire.present((b"a.b", b"c d", b"\x01", b"\xff", b"x@y", b'q"', b"\\", b"ok")) == \
        'a\\.b.c\\ d.\\001.\\255.x\\@y.q\\".\\\\.ok.'


def test_nxdomain_instead_of_refused():
    query = parse_query(build_query({"name": "support.github.com"}))
    reply = wire.parse(refusal(query, NXDOMAIN))
    assert reply.header.rcode == NXDOMAIN and reply.questions == (query.question,)


def test_oracle_failure_is_servfail():
    class Broken:
        def dns_verdict(self, *args):
            raise RuntimeError("engine exploded")

    query = parse_query(build_query({"name": "api.github.com"}))
    with pytest.raises(DNSProtocolError) as info:
        check_policy(Broken(), query, KUBE_DNS)
    assert info.value.rcode == SERVFAIL
    reply = wire.parse(info.value.reply)
    assert reply.header.rcode == SERVFAIL and reply.header.id == query.id


# -- 3–5. forward, learn, release -----------------------------------------------------------------
@pytest.mark.parametrize("case", cases("answers.yaml"))
def test_answer(case):
    qspec = case["query"]
    query = parse_query(build_query(qspec))
    dest = Destination(*address(case.get("server", "10.200.0.53:53")), "UDP")
    table = Outstanding()
    pending = table.register("upstream-1", query, dest, upstream_id=UPSTREAM_ID)
    answers = case["answer"] if isinstance(case["answer"], list) else [case["answer"]]
    for spec in answers[:-1]:
        with pytest.raises(Mismatch):
            table.match("upstream-1", build_answer(spec, qspec), address(spec.get("source", case.get("server", "10.200.0.53:53"))))
        assert len(table) == 1, "a discarded message leaves the query outstanding"
    last = answers[-1]
    data = build_answer(last, qspec)
    source = address(last.get("source", case.get("server", "10.200.0.53:53")))
    expect = case["expect"]
    if expect["outcome"] == "discard":
        with pytest.raises(Mismatch):
            table.match("upstream-1", data, source)
        assert len(table) == 1
        return
    matched, response = table.match("upstream-1", data, source)
    assert matched is pending and len(table) == 0
    if expect["outcome"] == "servfail":
        with pytest.raises(DNSProtocolError) as info:
            learn(query, response)
        assert info.value.rcode == SERVFAIL
        assert wire.parse(info.value.reply).header.id == query.id
        return
    assert expect["outcome"] == "relay"
    learned = learn(query, response)
    assert list(learned.ips) == expect["ips"]
    for key in ("ttl", "cnames", "rrtypes"):
        if key in expect:
            got = learned.ttl if key == "ttl" else list(getattr(learned, key))
            assert got == expect[key], key
    out = release(response, query)
    assert out[:2] == query.id.to_bytes(2, "big"), "the client's ID is restored"
    assert out[2:] == data[2:], "everything else is relayed byte for byte (TTLs untouched)"


def test_answers_on_another_upstream_do_not_count():
    query = parse_query(build_query({"name": "api.github.com"}))
    table = Outstanding()
    table.register("upstream-1", query, KUBE_DNS, upstream_id=UPSTREAM_ID)
    data = build_answer({"answers": [["api.github.com", "A", 60, "192.0.2.10"]]}, {"name": "api.github.com"})
    with pytest.raises(Mismatch):
        table.match("upstream-2", data, ("10.200.0.53", 53))
    assert table.match("upstream-1", data, ("10.200.0.53", 53))


def test_upstream_ids_are_unique_per_upstream():
    query = parse_query(build_query({"name": "api.github.com"}))
    table = Outstanding()
    ids = {table.register("tcp-conn", query, KUBE_DNS).upstream_id for _ in range(table.max_per_upstream)}
    assert len(ids) == table.max_per_upstream


def test_queries_waiting_on_one_upstream_are_bounded():
    """Beyond `max_per_upstream` SERVFAIL at once (65536 waiting left no free ID to draw: the
    loop drawing one never ended); other upstreams are not affected; an answer frees a place."""
    query = parse_query(build_query({"name": "api.github.com", "id": 0x4242}))
    table = Outstanding(max_per_upstream=3)
    waiting = [table.register("up-1", query, KUBE_DNS) for _ in range(3)]
    with pytest.raises(DNSProtocolError) as info:
        table.register("up-1", query, KUBE_DNS)
    assert info.value.rcode == SERVFAIL and wire.parse_header(info.value.reply).id == 0x4242
    table.register("up-2", query, KUBE_DNS)
    table.cancel(waiting[0])
    table.cancel(waiting[0])  # twice: counted once
    table.register("up-1", query, KUBE_DNS)
    with pytest.raises(DNSProtocolError):
        table.register("up-1", query, KUBE_DNS)
    assert len(table.cancel_all("up-1")) == 3 and len(table) == 1
    assert len([table.register("up-1", query, KUBE_DNS) for _ in range(3)]) == 3


@pytest.mark.parametrize("case", cases("tcp_framing.yaml"))
def test_tcp_framing(case):
    framer = TCPFramer()
    got = []
    for chunk in case["chunks"]:
        got += framer.feed(hexbytes(chunk))
    assert got == [hexbytes(m) for m in case["messages"]]
    assert framer.buffered == case["buffered"]


def test_tcp_frame_roundtrip():
    msgs = [build_query({"name": n}) for n in ("api.github.com", "www.github.com", ".")]
    stream = b"".join(TCPFramer.frame(m) for m in msgs)
    framer = TCPFramer()
    out = [m for i in range(len(stream)) for m in framer.feed(stream[i:i + 1])]
    assert out == msgs


# -- never crash: every corpus message mutated many times -----------------------------------------
def _mutations(data: bytes, rng: random.Random):
    for _ in range(60):
        b = bytearray(data)
        op = rng.randrange(5)
        if op == 0 and b:
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        elif op == 1:
            b = b[:rng.randrange(len(b) + 1)]
        elif op == 2 and b:
            pos = rng.randrange(len(b))
            b[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 8)))
        elif op == 3 and len(b) > 13:
            pos = rng.randrange(12, len(b) - 1)
            b[pos], b[pos + 1] = 0xC0 | rng.randrange(64), rng.randrange(256)
        elif op == 4 and len(b) >= 12:
            b[rng.randrange(4, 12)] = rng.randrange(256)
        yield bytes(b)


def test_mutated_messages_never_crash():
    rng = random.Random(20240601)
    queries = [build_query(c["query"]) for c in corpus("queries.yaml")["cases"]]
    answers = [(c["query"], a) for c in corpus("answers.yaml")["cases"]
               for a in (c["answer"] if isinstance(c["answer"], list) else [c["answer"]])]
    started = time.monotonic()
    tried = 0
    for data in queries:
        for mutated in _mutations(data, rng):
            tried += 1
            try:
                q = parse_query(mutated)
            except DNSProtocolError as e:
                assert e.reply is None or wire.parse_header(e.reply).qr
            else:
                assert q.qname.endswith(".")
    for qspec, aspec in answers:
        query = parse_query(build_query(qspec))
        for mutated in _mutations(build_answer(aspec, qspec), rng):
            tried += 1
            table = Outstanding()
            table.register("u", query, KUBE_DNS, upstream_id=UPSTREAM_ID)
            try:
                _, response = table.match("u", mutated, ("10.200.0.53", 53))
            except Mismatch:
                continue
            try:
                learn(query, response)
            except DNSProtocolError as e:
                assert e.rcode == SERVFAIL
            assert release(response, query)[2:] == mutated[2:]
    assert tried > 5000
    assert time.monotonic() - started < 10


# -- the whole chain as the server runs it (Server.answer), upstream scripted ---------------------
GITHUB_ZONE = {
    "api.github.com": [["api.github.com", "A", 60, "192.0.2.10"]],
    "www.github.com": [["www.github.com", "CNAME", 300, "github.com"], ["github.com", "A", 60, "192.0.2.12"]],
}


def scripted_upstream(zone=GITHUB_ZONE, delay=0.0, log=None):
    """An exchange that answers from `zone` (what the UDP/TCP upstream code returns)."""
    async def exchange(query: Query, server: Destination):
        if log is not None:
            log.append((query.qname, server))
        await asyncio.sleep(delay)
        table = Outstanding()
        table.register("u", query, server, upstream_id=UPSTREAM_ID)
        name = query.qname.rstrip(".")
        spec = {"answers": zone.get(name, []), "rcode": "NOERROR" if name in zone else "NXDOMAIN"}
        return table.match("u", build_answer(spec, {"name": name}), (server.ip, server.port))[1]
    return exchange


def run_answer(server: Server, name: str, dest=KUBE_DNS, exchange=None, **qspec):
    data = build_query({"name": name, **qspec})
    return asyncio.run(server.answer(data, CLIENT, dest, exchange or scripted_upstream()))


def test_chain_allowed_learns_before_release_and_relays():
    opened = []

    async def open_ips(name, ips, ttl):
        await asyncio.sleep(0.02)
        opened.append((name, ips, ttl, time.monotonic()))

    flows = []
    oracle = make_oracle(["policies/dns/matchname.yaml"], open_ips=open_ips)
    server = Server(oracle, on_flow=flows.append)
    reply = run_answer(server, "www.github.com")
    released = time.monotonic()
    msg = wire.parse(reply)
    assert msg.header.id == 0x1234 and msg.header.rcode == 0
    assert [r.value for r in msg.answers if r.rtype == 1] == ["192.0.2.12"]
    assert opened and opened[0][:3] == ("www.github.com.", ["192.0.2.12"], 60)
    assert opened[0][3] <= released
    now = time.monotonic()
    assert oracle.cache.lookup("www.github.com.", now) == {"192.0.2.12"}
    assert oracle.cache.lookup("github.com.", now) == set(), "CNAME targets are not learned"
    (flow,) = flows
    assert flow["verdict"] == "FORWARDED" and flow["rcode"] == 0
    assert (flow["qname"], flow["qtypes"], flow["ips"], flow["ttl"], flow["cnames"]) == \
        ("www.github.com.", ["A"], ["192.0.2.12"], 60, ["github.com."])
    assert (flow["src_ip"], flow["dst_ip"], flow["dst_port"], flow["protocol"]) == \
        ("10.200.0.41", "10.200.0.53", 53, "UDP")
    assert flow["policies"] == [{"kind": "CiliumNetworkPolicy", "namespace": "default", "name": "fqdn"}]


def test_chain_denied_is_refused_without_forwarding():
    asked, flows = [], []
    server = Server(make_oracle(["tests/data/dns_corpus/policy-dns-rules.yaml"]), on_flow=flows.append)
    reply = run_answer(server, "support.github.com", exchange=scripted_upstream(log=asked))
    assert wire.parse(reply).header.rcode == REFUSED
    assert asked == [], "a denied query never reaches the upstream"
    assert [f["verdict"] for f in flows] == ["DROPPED"] and flows[0]["rcode"] == REFUSED


def test_chain_reject_rcode_nxdomain():
    server = Server(make_oracle(["tests/data/dns_corpus/policy-dns-rules.yaml"]), reject_rcode=NXDOMAIN)
    assert wire.parse(run_answer(server, "support.github.com")).header.rcode == NXDOMAIN


def test_chain_forwards_to_the_server_asked():
    asked = []
    server = Server(make_oracle(["tests/data/dns_corpus/policy-dns-rules.yaml"]))
    other = Destination("10.200.0.54", 53, "TCP")
    reply = run_answer(server, "support.github.com", dest=other, exchange=scripted_upstream(log=asked))
    assert asked == [("support.github.com.", other)]
    assert wire.parse(reply).header.rcode == 3  # not in the scripted zone


def test_chain_upstream_timeout_sends_nothing():
    """An exchange times out on its own (upstream_timeout; the sockets' tests wait for a silent
    server); the chain then answers nothing and says why."""
    async def silent(query, server):
        await asyncio.sleep(0.01)
        raise TimeoutError

    flows = []
    server = Server(make_oracle(["policies/dns/matchname.yaml"]), on_flow=flows.append)
    assert run_answer(server, "api.github.com", exchange=silent) is None
    assert flows[0]["verdict"] == "ERROR" and flows[0]["rcode"] is None
    assert flows[0]["reason"] == "upstream timeout: no reply"


def test_chain_unreachable_upstream_is_servfail():
    async def refused(query, server):
        raise UpstreamFailed("connection refused")

    server = Server(make_oracle(["policies/dns/matchname.yaml"]))
    assert wire.parse(run_answer(server, "api.github.com", exchange=refused)).header.rcode == SERVFAIL


def test_chain_datapath_failure_is_servfail_not_release():
    async def open_ips(name, ips, ttl):
        raise OSError("nft: cannot add element")

    server = Server(make_oracle(["policies/dns/matchname.yaml"], open_ips=open_ips))
    assert wire.parse(run_answer(server, "api.github.com")).header.rcode == SERVFAIL


def test_chain_malformed_query_is_formerr_and_counted():
    flows = []
    server = Server(make_oracle(["policies/dns/matchname.yaml"]), on_flow=flows.append)
    data = build_query({"name": "api.github.com", "counts": {"qd": 2}})
    reply = asyncio.run(server.answer(data, CLIENT, KUBE_DNS, scripted_upstream()))
    assert wire.parse(reply).header.rcode == FORMERR
    assert server.stats["malformed"] == 1 and flows[0]["verdict"] == "DROPPED"
    assert asyncio.run(server.answer(b"\x12\x34", CLIENT, KUBE_DNS, scripted_upstream())) is None


def test_events_tell_the_observer_what_their_dicts_would():
    """A DNSEvent is read by the observer through its attributes, never built; they must be what
    the observe functions read from its dict, whatever happened to the query."""
    from proxy.observe.flow import event_time_ns, http_latency_ns, proxy_event_kind, proxy_flow_count

    async def silent(query, server):
        raise TimeoutError

    async def refused(query, server):
        raise UpstreamFailed("connection refused")

    events = []
    allow_github = Server(make_oracle(["tests/data/agent/dns-rules-github.yaml"]), on_flow=events.append)
    for name in ("www.github.com", "api.github.com", "nx.github.com", "cilium.io"):  # CNAME, A, NX, denied
        run_answer(allow_github, name)
        run_answer(allow_github, name, dest=Destination(KUBE_DNS.ip, 53, "TCP"), qtype="AAAA")
    for exchange in (silent, refused):
        run_answer(allow_github, "api.github.com", exchange=exchange)
    asyncio.run(allow_github.answer(b"\x12\x34garbage", CLIENT, KUBE_DNS, scripted_upstream()))
    seen = set()
    for ev in events:
        d = dict(ev)
        assert ev.kind == proxy_event_kind(d), d
        assert ev.flow_count == proxy_flow_count(d)
        assert ev.http_latency_ns == http_latency_ns(d)
        assert ev.time_ns == event_time_ns(d, None)
        assert (ev.src_ip, ev.dst_ip) == (d["src_ip"], d["dst_ip"])
        seen.add((d["verdict"], d["rcode"], bool(d["ips"]), bool(d["cnames"]), d["protocol"]))
    assert {v for v, *_ in seen} == {"FORWARDED", "DROPPED", "ERROR"}
    assert {r for _, r, *_ in seen} >= {0, 3, 5, 2, None}  # NOERROR NXDOMAIN REFUSED SERVFAIL, none
    assert (True, True) in {(i, c) for _, _, i, c, _ in seen} and {p for *_, p in seen} == {"UDP", "TCP"}
