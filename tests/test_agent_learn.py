"""The agent opens learned addresses in the kernel before an answer is released, and writes an
element again only when the kernel's one would expire before the new TTL (a real Agent and its
nftables table, in a scratch network namespace of its own: `unshare --net`)."""
from __future__ import annotations

import pytest

from clitool import run_in_scratch_netns
from needs import nft_unusable_reason

pytestmark = pytest.mark.skipif(nft_unusable_reason() is not None, reason=str(nft_unusable_reason()))

SCRIPT = r'''
import asyncio, json, os, sys, tempfile
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from proxy.agent.run import Agent, AgentConfig, FQDN_SLACK, parse_labels
from proxy.datapath import nft

POLICY = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: learn, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: learner}}
  egress:
    - toFQDNs: [{matchPattern: "*.example"}]
      toPorts: [{ports: [{port: "80", protocol: TCP}]}]
"""

async def main():
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "p").mkdir()
        (Path(tmp) / "p" / "learn.yaml").write_text(POLICY)
        os.utime(Path(tmp) / "p" / "learn.yaml", (1, 1))  # long written: read at once (settled)
        agent = Agent(AgentConfig(policies=f"{tmp}/p", registry=f"{tmp}/r", name="learner",
                                  labels=parse_labels("app=learner"), ips=["10.9.0.2"]))
        agent.sync(force=True)
        out = {"slack": FQDN_SLACK}
        async def learn(name, ttl):
            await agent.oracle.learn(name, ["192.0.2.7"], ttl)
            left = nft.fqdn_elements()["192.0.2.7"][1]  # seconds until the kernel drops it
            return {"batches": agent._fqdn_elements.batches, "expires": left}
        out["first"] = await learn("a.example", 30)        # a new identity: a whole new table
        out["second"] = await learn("a.example", 30)       # its elements: the cache's expiries
        out["again"] = await learn("a.example", 30)        # within what the kernel holds: no write
        out["nothing_to_wait_for"] = agent._open_ips("a.example", ["192.0.2.7"], 30) is None
        out["longer"] = await learn("a.example", 60)       # beyond it: written again
        agent.apply()                                       # a new table: written again next time
        out["after_apply"] = await learn("a.example", 30)
        nft.delete_table()
        print(json.dumps(out))

asyncio.run(main())
'''


def test_an_element_is_rewritten_only_when_the_kernel_would_expire_it_too_soon():
    out = run_in_scratch_netns(SCRIPT)
    slack = out["slack"]
    assert out["first"]["batches"] == 0 and 29 <= out["first"]["expires"] <= 30, "in the new table"
    assert out["second"]["batches"] == 1 and 30 <= out["second"]["expires"] <= 30 + slack
    assert out["again"]["batches"] == 1, "the kernel's element already covers the new TTL"
    assert out["nothing_to_wait_for"], "a busy name's answer does not wait on the datapath"
    assert out["longer"]["batches"] == 2 and 59 <= out["longer"]["expires"] <= 60 + slack
    assert out["after_apply"]["batches"] == 3
