"""The agent against what others may do to the shared registry, and its start: a record of its
own that disappears is published again; a malformed record of someone else's stops nothing; peers
learn the endpoint before its policy lets anything through (a real Agent and its nftables table,
in a scratch network namespace: `unshare --net`)."""
from __future__ import annotations

import pytest

from clitool import run_in_scratch_netns
from needs import nft_unusable_reason

pytestmark = pytest.mark.skipif(nft_unusable_reason() is not None, reason=str(nft_unusable_reason()))

PRELUDE = r'''
import asyncio, json, os, sys, tempfile, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from proxy.agent import run as agent_run
from proxy.agent.run import Agent, AgentConfig, parse_labels
from proxy.datapath import nft

POLICY = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: web, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: web}}
  ingress: [{toPorts: [{ports: [{port: "%d"}]}]}]
"""

def settled(path, text):
    path.write_text(text)
    os.utime(path, (1, 1))  # long written: read at once

def agent_in(tmp):
    pol, reg = Path(tmp, "p"), Path(tmp, "r")
    pol.mkdir()
    settled(pol / "web.yaml", POLICY % 80)
    return Agent(AgentConfig(policies=str(pol), registry=str(reg), name="web",
                             labels=parse_labels("app=web"), ips=["10.9.0.2"])), pol, reg
'''

REGISTRY = PRELUDE + r'''
with tempfile.TemporaryDirectory() as tmp:
    agent, pol, reg = agent_in(tmp)
    agent.sync(force=True)
    agent.publish()
    out = {"published": agent.registry.record("web") == agent.record()}
    agent.registry.withdraw("web")
    agent.sync()
    out["republished"] = agent.registry.record("web") == agent.record()
    (reg / "endpoints" / "evil.json").write_text(json.dumps({"name": "evil", "ips": "10.9.0.3"}))
    (reg / "endpoints" / "host.json").write_text(json.dumps(
        {"name": "host", "labels": {"reserved:host": ""}, "ips": ["10.9.0.4"]}))
    settled(pol / "web.yaml", POLICY % 81)
    out["synced"] = agent.sync()
    out["ports"] = [p.rules[0].ingress[0].to_ports[0].ports[0].port for p in agent.policy_dir.policies()]
    out["peers"] = sorted(e.name for e in agent.engine.endpoints)
    nft.delete_table()
    print(json.dumps(out))
'''


def test_a_lost_record_is_published_again_and_bad_records_stop_nothing():
    assert run_in_scratch_netns(REGISTRY) == {
        "published": True, "republished": True, "synced": True, "ports": ["81"], "peers": ["web"]}


STARTUP = PRELUDE + r'''
async def main(tmp):
    agent, _, _ = agent_in(tmp)
    agent.registry.ready_path("web").touch()  # left by a killed agent
    task = asyncio.create_task(agent.main())
    seen = {}
    t0 = time.monotonic()
    while "ready" not in seen and time.monotonic() - t0 < 10:
        now = time.monotonic() - t0
        if agent.registry.ready_path("web").exists() and "stale_gone" in seen:
            seen.setdefault("ready", now)
        if not agent.registry.ready_path("web").exists():
            seen.setdefault("stale_gone", now)
        if agent.registry.record("web") is not None:
            seen.setdefault("record", now)
        if nft.table_exists() and "closed" not in nft.list_table():
            seen.setdefault("open", now)
        await asyncio.sleep(0.01)
    os.kill(os.getpid(), 15)
    await task
    seen["grace"] = agent_run.PEER_GRACE
    seen["closed_after_stop"] = "closed" in nft.list_table()
    nft.delete_table()
    return seen

with tempfile.TemporaryDirectory() as tmp:
    print(json.dumps(asyncio.run(main(tmp))))
'''


def test_peers_know_the_endpoint_before_its_policy_lets_traffic_through():
    """A restarted agent's address was `world` to its peers until their next poll, while its
    own policy already let traffic through (a peer's label deny missed it): the record is
    published a peer poll before the table opens; readiness comes after that."""
    seen = run_in_scratch_netns(STARTUP)
    assert seen["stale_gone"] < seen["record"], seen
    assert seen["open"] - seen["record"] >= seen["grace"] * 0.9, seen
    assert seen["ready"] >= seen["open"] and seen["closed_after_stop"], seen
