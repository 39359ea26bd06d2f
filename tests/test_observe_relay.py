"""`l7gate observe` against real agents' control sockets (unix sockets in a temp registry).

Each fake agent is the real agent-side code: a FlowRing answered by `handle_observe`, behind a
unix server that dispatches `{"cmd": "observe"}` the way the agent's control socket does.
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import threading
import time

import pytest

from proxy.observe import relay
from proxy.observe.flow import parse_time, rfc3339
from proxy.observe.format import compact
from proxy.observe.ring import FlowRing
from test_observe_flow import CASES, build


class Agents:
    """Agents serving rings on <registry>/agents/<name>.sock, on a loop in a thread."""

    def __init__(self, registry) -> None:
        self.registry = registry
        (registry / "agents").mkdir(parents=True, exist_ok=True)
        self.rings: dict[str, FlowRing] = {}
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.servers = []

    def add(self, name: str) -> FlowRing:
        ring = self.rings[name] = FlowRing(size=100)

        async def on_client(reader, writer):
            try:
                request = json.loads(await reader.readline())
                if request.get("cmd") == "observe":
                    await relay.handle_observe(ring, request, writer, reader)
            finally:
                writer.close()

        async def start():
            return await asyncio.start_unix_server(
                on_client, path=str(self.registry / "agents" / f"{name}.sock"))
        self.servers.append(asyncio.run_coroutine_threadsafe(start(), self.loop).result(5))
        return ring

    def append(self, name: str, flows: list[dict]) -> None:
        def do():
            for f in flows:
                self.rings[name].append(f)
        self.loop.call_soon_threadsafe(do)

    def close(self) -> None:
        async def stop():
            for s in self.servers:
                s.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture
def agents(tmp_path):
    a = Agents(tmp_path / "registry")
    yield a
    a.close()


def args(registry, *argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    relay.add_parser_arguments(p)
    return p.parse_args([*argv, "--registry", str(registry)])


def observe(registry, *argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    rc = relay.run(args(registry, *argv), out, err)
    return rc, out.getvalue(), err.getvalue()


def flows_of(prefix: str, shift_s: float = 0) -> list[dict]:
    flows = build(next(c for c in CASES if c["name"].startswith(prefix)))
    for f in flows:
        f["time"] = rfc3339(parse_time(f["time"]) + int(shift_s * 1e9))
    return flows


def seed(agents: Agents) -> None:
    deathstar = agents.add("deathstar")
    xwing = agents.add("xwing")
    for f in flows_of("allowed L7") + flows_of("denied L7") + flows_of("a dropped SYN"):
        deathstar.append(f)
    for f in flows_of("an allowed DNS", shift_s=-4):  # 21:03:17: between the L7 pairs and the SYN
        xwing.append(f)


def test_histories_of_all_agents_are_merged_in_time_order(agents):
    seed(agents)
    rc, out, err = observe(agents.registry, "--last", "100")
    lines = out.splitlines()
    assert rc == 0 and err == ""
    assert len(lines) == 2 + 2 + 2 + 2
    times = [line.split(": ", 1)[0] for line in lines]
    assert times == sorted(times)
    assert "dns-request proxy FORWARDED" in lines[4]


def test_last_n_is_global_not_per_agent(agents):
    seed(agents)
    rc, out, _ = observe(agents.registry, "--last", "3")
    lines = out.splitlines()
    assert len(lines) == 3
    assert "dns-response proxy" in lines[0] and "Policy denied DROPPED" in lines[2]


def test_the_star_wars_l7_step_shows_the_seeds_lines(agents):
    seed(agents)
    _, out, _ = observe(agents.registry, "--pod", "deathstar", "--verdict", "DROPPED")
    # the seed's `hubble observe --pod deathstar --verdict DROPPED`, in the same order
    assert [line.split(") ", 2)[-1] for line in out.splitlines()] == [
        "http-request DROPPED (HTTP/1.1 PUT http://deathstar.default.svc.cluster.local/v1/exhaust-port)",
        "policy-verdict:none INGRESS DENIED (TCP Flags: SYN)",
        "Policy denied DROPPED (TCP Flags: SYN)"]
    assert any(line.startswith("Apr  5 21:03:15.919: default/tiefighter:44396 (ID:25698) -> "
                               "default/deathstar-b4b8ccfb5-f75xw:80 (ID:6822) http-request DROPPED")
               for line in out.splitlines())
    assert any("default/xwing:45706 (ID:63406) <> default/deathstar-b4b8ccfb5-f75xw:80 (ID:6822) "
               "Policy denied DROPPED (TCP Flags: SYN)" in line for line in out.splitlines())


def test_filters_are_applied_by_the_agents(agents):
    seed(agents)
    _, out, _ = observe(agents.registry, "--from-pod", "default/xwing", "--type", "drop")
    assert len(out.splitlines()) == 1 and "Policy denied DROPPED" in out
    _, out, _ = observe(agents.registry, "--protocol", "dns", "-n", "100")
    assert len(out.splitlines()) == 2
    _, out, _ = observe(agents.registry, "--label", "class=tiefighter", "--protocol", "http",
                        "--print-policy-names")
    assert len(out.splitlines()) == 4 and "DROPPED BY rule1 (CiliumNetworkPolicy)" in out


def test_json_output_is_get_flows_responses(agents):
    seed(agents)
    _, out, _ = observe(agents.registry, "-o", "json", "--last", "100")
    msgs = [json.loads(line) for line in out.splitlines()]
    assert len(msgs) == 8 and all(set(m) == {"flow", "node_name", "time"} for m in msgs)
    assert msgs[-1]["flow"]["drop_reason_desc"] == "POLICY_DENIED"


def test_since_is_relative_to_now(agents):
    ring = agents.add("one")
    old = flows_of("allowed L7")
    new = [dict(f, time=rfc3339(time.time_ns())) for f in flows_of("denied L7")]
    for f in old + new:
        ring.append(f)
    _, out, _ = observe(agents.registry, "--since", "1m")
    assert len(out.splitlines()) == 2 and "exhaust-port" in out


def test_no_flags_means_the_last_20(agents):
    ring = agents.add("one")
    flow = flows_of("a dropped SYN")[1]
    for i in range(30):
        ring.append(dict(flow, time=rfc3339(parse_time(flow["time"]) + i)))
    _, out, _ = observe(agents.registry)
    assert len(out.splitlines()) == 20


def test_no_agent_is_an_error(tmp_path):
    (tmp_path / "agents").mkdir()
    rc, out, err = observe(tmp_path)
    assert rc == 1 and out == "" and "no agent answers" in err


def test_bad_arguments_exit_2(agents):
    agents.add("one")
    rc, _, err = observe(agents.registry, "--protocol", "gopher")
    assert rc == 2 and "gopher" in err
    rc, _, err = observe(agents.registry, "--since", "yesterday")
    assert rc == 2


def test_a_bad_request_gets_an_error_line(agents):
    ring = agents.add("one")

    async def ask():
        r, w = await asyncio.open_unix_connection(str(agents.registry / "agents" / "one.sock"))
        w.write(json.dumps({"cmd": "observe", "filter": {"verdicts": 3}}).encode() + b"\n")
        line = await r.readline()
        w.close()
        return json.loads(line)
    answer = asyncio.run(ask())
    assert answer["ok"] is False and "bad observe request" in answer["error"]
    assert len(ring) == 0


def test_follow_streams_new_flows_from_every_agent_including_late_ones(agents, monkeypatch):
    monkeypatch.setattr(relay, "RESCAN", 0.1)
    seed(agents)
    out, err = io.StringIO(), io.StringIO()
    a = args(agents.registry, "--follow")
    request = relay.request_from_args(a)
    printer = relay.Printer(out, "compact", follow=True)

    def later():
        time.sleep(0.3)
        agents.append("deathstar", flows_of("denied L7"))
        late = agents.add("latecomer")
        time.sleep(0.4)
        agents.loop.call_soon_threadsafe(late.append, flows_of("an allowed DNS")[0])

    t = threading.Thread(target=later)
    t.start()

    async def bounded():
        try:
            await asyncio.wait_for(relay._observe(a, request, printer, err), 1.5)
        except asyncio.TimeoutError:
            pass
    asyncio.run(bounded())
    t.join()
    lines = out.getvalue().splitlines()
    # --follow alone starts from now: only the two new HTTP flows and the latecomer's DNS query
    assert len(lines) == 3, lines
    assert "http-request DROPPED" in lines[0] and "http-response FORWARDED" in lines[1]
    assert "dns-request proxy FORWARDED" in lines[2]


def test_follow_with_last_prints_history_then_new_flows(agents):
    seed(agents)
    out, err = io.StringIO(), io.StringIO()
    a = args(agents.registry, "--follow", "--last", "1", "--verdict", "DROPPED")
    request = relay.request_from_args(a)
    printer = relay.Printer(out, "compact", follow=True)
    agents_thread = threading.Timer(0.3, agents.append, ("xwing", flows_of("a dropped SYN")))
    agents_thread.start()

    async def bounded():
        try:
            await asyncio.wait_for(relay._observe(a, request, printer, err), 1.0)
        except asyncio.TimeoutError:
            pass
    asyncio.run(bounded())
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 + 2  # the last DROPPED of history, then the new DENIED verdict and drop
    assert "Policy denied DROPPED" in lines[0] and "DENIED" in lines[1] and "DROPPED" in lines[2]
    assert lines[0] == compact(flows_of("a dropped SYN")[1])
