"""`l7gate run`: the sidecar agent for one workload, in the foreground (a container entrypoint).

Order of things, so traffic is never open: install the closed table first; start the proxies;
compute the policy and swap in the real table (one nftables transaction); only then publish the
endpoint in the registry (that is the readiness signal the lab and compose wait for). Every
half second: reload the policies directory and the registry when they changed and re-sync.
Stopped (SIGTERM/SIGINT) or killed, the workload stays closed: the closed table is put back on a
clean stop, and on a kill the last table stays with its redirects pointing at dead proxy ports.
"""
from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field

from proxy.agent import control
from proxy.agent.batch import Batcher
from proxy.agent.oracle import EngineOracle
from proxy.agent.policydir import PolicyDir
from proxy.agent.registry import EndpointRecord, Registry
from proxy.agent.sync import build_state
from proxy.observe import EngineView, Observer
from proxy.datapath import compile as dp_compile
from proxy.datapath import nft, routing
from proxy.datapath.constants import DNS_PROXY_PORT, HTTP_PROXY_PORT, new_proxy_mark
from proxy.fqdn.cache import DNSCache
from proxy.policy.endpoint import Endpoint, Service
from proxy.policy.engine import Engine
from proxy.policy.identity import IdentityAllocator
from proxy.policy.labels import parse_label
from proxy.policy.repository import Options

log = logging.getLogger("l7gate.agent")
POLL = 0.5
PEER_GRACE = 2 * POLL  # a record published is read by every peer within this


@dataclass
class AgentConfig:
    policies: str
    registry: str
    name: str
    labels: dict[str, str]
    namespace: str = "default"
    service_account: str = "default"
    http_port: int = HTTP_PROXY_PORT
    dns_port: int = DNS_PROXY_PORT
    enforcement: str = "default"
    ips: list[str] = field(default_factory=list)
    metrics: str | None = None  # --metrics ADDR
    flow_buffer: int = 4096  # --flow-buffer N
    log_allowed: bool = False  # --log-allowed


def parse_labels(text: str) -> dict[str, str]:
    out = {}
    for part in filter(None, (p.strip() for p in (text or "").split(","))):
        lb = parse_label(part)
        out[f"{lb.source}:{lb.key}"] = lb.value
    return out


def local_ips() -> list[str]:
    """The workload's own global addresses (this process runs in its network namespace)."""
    out = subprocess.run(["ip", "-j", "addr", "show"], capture_output=True, text=True, check=True)
    ips = []
    for link in json.loads(out.stdout):
        for a in link.get("addr_info", []):
            addr = ipaddress.ip_address(a["local"])
            if not (addr.is_loopback or addr.is_link_local):
                ips.append(str(addr))
    return ips


def _add_fqdn_elements(elements: list[tuple[str, int, int]]) -> None:
    """One transaction for a batch of answers: an IP learned twice keeps its latest identity and
    its longest timeout (the cache keeps the later expiry too)."""
    merged: dict[str, tuple[int, int]] = {}
    for ip, ident, ttl in elements:
        old = merged.get(ip)
        merged[ip] = (ident, ttl if old is None else max(ttl, old[1]))
    nft.add_fqdn_elements([(ip, ident, ttl) for ip, (ident, ttl) in merged.items()])


FQDN_SLACK = 1  # seconds an FQDN element outlives its DNS TTL (see Agent._open_ips)


class Agent:
    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg
        self.proxy_mark = new_proxy_mark()  # secret: its packets skip the policy (not in argv/env)
        self.registry = Registry(cfg.registry)
        self.policy_dir = PolicyDir(cfg.policies)
        self.ids = IdentityAllocator(reserve=self.registry.reserve_identity)
        self.cache = DNSCache()
        self.me = Endpoint(cfg.name, cfg.namespace, cfg.labels, service_account=cfg.service_account,
                           ips=cfg.ips)
        self.engine = self._engine([], [])
        self.oracle = EngineOracle(self.engine, cfg.name, open_ips=self._open_ips)
        self._registry_version: tuple | None = None
        self._unsynced = False  # a sync failed: try again at the next one
        self._policy_problem: str | None = None
        self._fqdn_elements = Batcher(_add_fqdn_elements)  # one transaction per loop turn
        self._written: dict[str, tuple[int, float]] = {}  # FQDN element -> (identity, expiry)
        self._ip_ids: dict[str, tuple] = {}  # see _ip_identity
        self._table_ids: set[int] = set()
        self._ready = False
        view = EngineView(lambda: self.engine, cfg.name)
        self.observer = Observer(cfg.name, resolve=view.resolve, explain=view.explain,
                                 ring_size=cfg.flow_buffer)  # bounded: memory never grows with traffic

    def _engine(self, others: list[Endpoint], services: list[Service]) -> Engine:
        eps = [self.me] + [e for e in others if e.name != self.me.name]
        return Engine(self.policy_dir.policies(), eps, services, self.cache,
                      Options(enforcement=self.cfg.enforcement), clock=time.time, ids=self.ids)

    # -- sync ---------------------------------------------------------------------------------
    def sync(self, force: bool = False) -> bool:
        """Apply what changed. The new engine serves the proxies only once the kernel has its
        table; a sync that failed is tried again at the next call."""
        changed = self.policy_dir.poll()
        for err in self.policy_dir.errors if changed else []:
            log.warning("policy not in force: %s", err)
        problem = self.policy_dir.problem
        if problem != self._policy_problem:
            self._policy_problem = problem
            if problem:
                log.warning("policies directory: %s; the policies in force stay", problem)
        if self._ready and self.registry.record(self.me.name) != self.record():
            self.publish()  # removed or overwritten: peers must keep seeing us as we are
        version = self.registry.version()
        if version != self._registry_version:
            self._registry_version = version
            changed = True
        if not (changed or force or self._unsynced):
            return False
        self._unsynced = True
        others = [r.endpoint() for r in self.registry.endpoints()]
        engine = self._engine(others, self.registry.services())
        self.apply(engine)
        self.engine = engine
        self.oracle.engine = engine
        self._unsynced = False
        return True

    def apply(self, engine: Engine | None = None) -> None:
        engine = engine or self.engine
        state = build_state(engine, engine.peer(self.me.name), self.cfg.http_port,
                            self.cfg.dns_port, self.proxy_mark)
        nft.apply(dp_compile.compile_table(state, log_allowed=self.cfg.log_allowed))
        self._table_ids = ({2} | set(state.ipcache.values())
                           | {ident for ident, _ in state.fqdn.values()})
        self._written = {}  # the new table's elements carry the cache's own expiries

    def _open_ips(self, qname: str, ips: list[str], ttl: int) -> Awaitable[None] | None:
        """A DNS answer was learned (already in the cache): open matching IPs before release.
        Returns what to await for that, None when nothing is left to wait for.

        Usually the IPs' identity (world + prefixes + matching toFQDNs selectors) is already in
        the table, so adding the elements is enough; a new identity needs its policy entries,
        which means a full (still atomic) table update.

        An element is written with FQDN_SLACK seconds more than the TTL, and not written again
        while the one in the kernel already outlives the new TTL: a busy name costs one
        transaction per FQDN_SLACK seconds, not one per answer, and an address is never closed
        before its TTL is over (at most FQDN_SLACK s after; Cilium's expiry is up to a minute
        late)."""
        elements = []
        now = time.monotonic()
        ttl = max(1, int(ttl))
        for ip in ips:
            ident = self._ip_identity(ip, now)
            if ident is None:
                continue  # an endpoint's address keeps the endpoint's identity
            if ident not in self._table_ids:
                self.apply()
                return None
            written = self._written.get(ip)
            if written is None or written[0] != ident or written[1] < now + ttl:
                elements.append((ip, ident, ttl + FQDN_SLACK))
        return self._write_fqdn_elements(elements, now) if elements else None

    async def _write_fqdn_elements(self, elements: list[tuple[str, int, int]], now: float) -> None:
        await self._fqdn_elements.add(elements)
        if len(self._written) > 65536:
            self._written = {}  # bounded: forgetting only costs a rewrite
        for ip, ident_id, timeout in elements:
            self._written[ip] = (ident_id, now + timeout)

    def _ip_identity(self, ip: str, now: float) -> int | None:
        """The identity of a learned address (None: an endpoint's), remembered for a second per
        engine and FQDN cache generation: a busy name is answered thousands of times a second."""
        gen = self.cache.generation
        hit = self._ip_ids.get(ip)
        if hit is not None and hit[0] is self.engine and hit[1] == gen and hit[2] > now:
            return hit[3]
        ident = None if self.engine.ip_peer(ip).endpoint is not None else self.engine.ip_identity(ip).id
        if len(self._ip_ids) > 65536:
            self._ip_ids = {}
        self._ip_ids[ip] = (self.engine, gen, now + 1.0, ident)
        return ident

    def record(self) -> EndpointRecord:
        ident = self.engine.identity_of(self.me)
        return EndpointRecord(self.me.name, self.me.namespace, self.cfg.labels,
                              self.me.service_account, self.me.ips, ident.id)

    def publish(self) -> None:
        self.registry.publish(self.record())
        if not self._ready:
            self.registry.ready_path(self.me.name).touch()
        self._ready = True

    async def _policies_readable(self) -> None:
        """Start with the policies as they will stay: the directory readable and no file in the
        middle of being written (the closed table holds meanwhile)."""
        told = False
        while True:
            self.policy_dir.poll()
            waiting = self.policy_dir.problem or self.policy_dir.settling
            if not waiting:
                return
            if not told:
                log.warning("waiting for the policies: %s", waiting)
                told = True
            await asyncio.sleep(0.1)

    # -- control socket -----------------------------------------------------------------------
    def handle(self, cmd: str):
        e = self.engine
        if cmd == "status":
            return {"name": self.me.name, "ready": self._ready}
        if cmd == "endpoint list":
            pol = e.policy_of(e.peer(self.me.name))
            ident = e.identity_of(self.me)
            word = lambda d: "Enabled" if d.enforced else "Disabled"  # noqa: E731
            return [{"name": f"{self.me.namespace}/{self.me.name}", "identity": ident.id,
                     "ingress": word(pol.ingress), "egress": word(pol.egress),
                     "labels": ident.labels.strings(), "ips": self.me.ips,
                     "status": "ready" if self._ready else "not-ready"}]
        if cmd == "identity list":
            out = {}
            for ep in e.endpoints:
                ident = e.identity_of(ep)
                out[ident.id] = {"id": ident.id, "labels": ident.labels.strings()}
            return list(out.values())
        if cmd == "fqdn cache list":
            now = time.time()
            return [{"name": c.name, "ip": c.ip,
                     "ttl": None if c.ttl_remaining is None else int(c.ttl_remaining),
                     "expires": None if c.expires_at is None else
                     time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(c.expires_at))}
                    for c in e.cache.entries(now)]
        if cmd == "policy get":
            return {"revision": e.repo.revision,
                    "policies": [p.ref.as_dict() for p in self.policy_dir.policies()],
                    "errors": [str(x) for x in self.policy_dir.errors]}
        raise KeyError(cmd)

    # -- main -----------------------------------------------------------------------------------
    async def main(self) -> int:
        from proxy.l7.dns import server as dns_server
        from proxy.l7.http import server as http_server

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:  # the proxies size their connection caps by it (fd exhaustion)
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        nft.apply(dp_compile.closed_table(proxy_mark=self.proxy_mark))
        # a record left by a killed agent would pass for this one: readiness (compose's
        # healthcheck) and peers must wait for the record published once the policy is in force
        self.registry.withdraw(self.me.name)
        routing.install()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            self.observer.start_nflog()
        except OSError as e:
            log.warning("kernel drops will not appear as flows: %s", e)
        if self.cfg.metrics:
            self.observer.serve_metrics(self.cfg.metrics)
        http = await http_server.serve(self.oracle, self.me.ips, port=self.cfg.http_port,
                                       on_flow=self.observer.on_proxy_event, mark=self.proxy_mark)
        dns = await dns_server.serve(self.oracle, port=self.cfg.dns_port,
                                     on_flow=self.observer.on_proxy_event, mark=self.proxy_mark)
        ctl = await control.serve(self.registry.socket_path(self.me.name), self.handle,
                                  observe=self.observer.handle_control)
        await self._policies_readable()
        # peers learn this endpoint's identity before its policy lets any traffic through: a
        # restarted agent's address is `world` to them until their next poll (a label deny missed it)
        self.registry.publish(self.record())
        await asyncio.sleep(PEER_GRACE)
        self.sync(force=True)
        self.publish()
        log.info("agent %s ready: identity %s", self.me.name, self.engine.identity_of(self.me).id)
        try:
            while not stop.is_set():
                try:
                    await asyncio.wait_for(stop.wait(), POLL)
                except asyncio.TimeoutError:
                    pass
                try:
                    self.sync()
                except Exception:  # a bad sync must not kill the agent: the last table stays
                    log.exception("sync failed; previous datapath state stays in force")
        finally:
            nft.apply(dp_compile.closed_table(proxy_mark=self.proxy_mark))
            self.registry.withdraw(self.me.name)
            self.registry.socket_path(self.me.name).unlink(missing_ok=True)
            ctl.close()
            http.close()
            dns.close()
            self.observer.close()
        return 0


def run(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        stream=sys.stderr)
    ips = local_ips()
    cfg = AgentConfig(policies=args.policies, registry=args.registry, name=args.name,
                      labels=parse_labels(args.labels), namespace=args.namespace,
                      service_account=args.service_account, enforcement=args.policy_enforcement,
                      ips=ips, metrics=args.metrics, flow_buffer=args.flow_buffer,
                      log_allowed=args.log_allowed)
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    return asyncio.run(Agent(cfg).main())

