"""`l7gate lab up/down/exec/status` for a user, and `Lab`, the handle the demos drive.

The CLI functions print for a person and return an exit code: 0 done, 1 failed (the message says
why and what was cleaned up), 2 a usage problem (bad lab file, unknown service, no privileges).
The demos use `start()` / `Lab.open()` and `Lab.run()` / `Lab.client()` instead, which raise
`LabError` rather than print.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from proxy.lab import rootless
from proxy.lab import topology as topo
from proxy.lab.netns import (
    Executor,
    LabError,
    LabExists,
    State,
    alive,
    labs,
    run_in,
    state_root,
    teardown,
)
from proxy.lab.spec import LabFileError, LabSpec, load

CLIENT = ["python", "-m", "proxy.lab.apps.client"]


class Lab:
    """A lab that is up: its nodes, directories, and a way to run things inside its workloads."""

    def __init__(self, dir: Path, data: dict) -> None:
        self.dir = dir
        self.data = data

    @property
    def name(self) -> str:
        return self.data["name"]

    @property
    def state_dir(self) -> str:
        return str(self.dir)

    @property
    def policies_dir(self) -> str:
        return str(self.dir / "policies")

    @property
    def registry_dir(self) -> str:
        return str(self.dir / "registry")

    @property
    def nodes(self) -> list[dict]:
        return self.data.get("nodes", [])

    @classmethod
    def open(cls, name: str | None = None, root: str | None = None) -> Lab:
        """The lab called `name`, or the only lab that is up."""
        found = [s for s in labs(state_root(root)) if name in (None, s.dir.name)]
        if not found:
            raise LabError(f"no lab named {name!r} is up" if name else "no lab is up")
        if len(found) > 1:
            raise LabError("several labs are up (" + ", ".join(s.dir.name for s in found)
                           + "): name one, as LAB:SERVICE")
        return cls(found[0].dir, found[0].data)

    def node(self, name: str) -> dict:
        """A node by workload name, service name (its first replica) or external host name."""
        for key in ("name", "service"):
            for n in self.nodes:
                if n.get(key) == name and (key == "name" or n["kind"] != "external"):
                    return n
        for n in self.nodes:
            if name in n.get("hostnames", []):
                return n
        names = ", ".join(n["name"] for n in self.nodes)
        raise LabError(f"lab {self.name} has no workload or host {name!r} (it has: {names})")

    def replicas(self, service: str) -> list[dict]:
        return [n for n in self.nodes if n.get("service") == service and n["kind"] == "workload"]

    def ip(self, name: str) -> str:
        return self.node(name)["ip"]

    def run(self, workload: str, argv: list[str], timeout: float | None = None,
            capture: bool = True, input: str | None = None) -> subprocess.CompletedProcess:
        """Run argv inside `workload` (output captured as text unless capture=False)."""
        n = self.node(workload)
        return run_in(n["netns"], argv, lab=self.name, workload=n["name"], state_dir=self.state_dir,
                      timeout=timeout, capture=capture, input=input)

    def client(self, workload: str, *args: str, timeout: float = 3.0) -> subprocess.CompletedProcess:
        """`python -m proxy.lab.apps.client ARGS --timeout T` inside `workload` (output captured)."""
        return self.run(workload, [*CLIENT, *args, "--timeout", str(timeout)], timeout=timeout + 10)

    def down(self, progress=None) -> list[str]:
        return teardown(self.dir, progress)


def _plan(spec: LabSpec, dir: Path) -> topo.Plan:
    etc = topo.ETC_NETNS
    if rootless.inside() and not rootless.etc_netns_usable():
        etc = "/run/.l7gate-etc/netns"  # not read by ip; resolv.conf is bound globally instead
    return topo.plan(spec, str(dir), sys.executable, etc)


def start(spec: LabSpec | str | os.PathLike, no_agents: bool = False, *, name: str | None = None,
          root: str | None = None, progress=None, agent_timeout: float = 20.0,
          wait_timeout: float = 10.0, _stop_after: int | None = None) -> Lab:
    """Build a lab (a LabSpec or a lab file; `name` overrides the file's); on any failure (or
    Ctrl-C) remove what was built and raise. Needs root: a command that may run unprivileged
    calls `rootless.privileges(what)` first (it re-executes the command in a user namespace).

    `_stop_after=N` performs only the first N steps and returns without marking the lab up or
    cleaning: what an `up` killed midway leaves behind (for tests)."""
    if not isinstance(spec, LabSpec):
        spec = load(spec)
    if name:
        spec.name = name
    if os.geteuid() != 0:
        raise LabError("the lab needs root (or call proxy.lab.rootless.privileges() first)")
    dir = state_root(root) / spec.name
    plan = _plan(spec, dir)
    steps = plan.steps(no_agents=no_agents, wait_timeout=wait_timeout, agent_timeout=agent_timeout)
    state = State.claim(dir, {
        "name": spec.name, "file": os.path.abspath(spec.file) if spec.file else "",
        "status": "building", "pid": os.getpid(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "subnet": plan.subnet,
        "switch": plan.switch_netns, "etc_netns": plan.etc_netns, "agents": not no_agents,
        "rootless": rootless.inside(), "nodes": plan.summary(), "zone": plan.zone["records"],
        "warnings": plan.warnings})
    if rootless.inside() and not rootless.etc_netns_usable():
        rootless.bind_resolv_conf(next(iter(plan.resolv.values())))
    try:
        Executor(plan, state, progress).run(steps, _stop_after)
    except BaseException:
        if _stop_after is None:
            teardown(dir)
        raise
    if _stop_after is None:
        state.data["status"] = "up"
        state.save()
    return Lab(dir, state.data)


# -- printing ----------------------------------------------------------------------------------

def _labels(d: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in d.items())


def print_lab(lab: Lab, out, procs: bool = False) -> None:
    st = State.load(lab.dir)
    running = {}
    if st is not None:
        for r in st.resources:
            if r["kind"] == "proc":
                running[r["id"]] = alive(r)
    rows = [("NAME", "NAMESPACE", "IP", "SIDECAR", "LABELS / HOSTNAMES")]
    for n in lab.nodes:
        if n["kind"] == "external":
            rows.append((n["name"], "(external)", n["ip"], "-", " ".join(n["hostnames"])))
            continue
        agent = f"{n['name']}/agent"
        side = "yes" if agent in running else ("off" if n["enforce"] else "no")
        if agent in running and not running[agent]:
            side = "DEAD"
        rows.append((n["name"], n["namespace"], n["ip"], side, _labels(n["labels"])))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[4], file=out)
    dead = [k for k, v in running.items() if not v]
    if procs and dead:
        print(f"  not running: {', '.join(dead)} (logs in {lab.dir}/logs/)", file=out)


def _summary(lab: Lab, no_agents: bool, out) -> None:
    n = len(lab.nodes)
    side = "off (--no-agents)" if no_agents else "on"
    print(f"lab {lab.name} is up: {n} workloads and hosts on {lab.data['subnet']}, sidecars {side}",
          file=out)
    print_lab(lab, out)
    dns = next(x for x in lab.nodes if x["kind"] == "dns")
    print(f"  DNS server {dns['name']} at {dns['ip']}: service names resolve short and as "
          f"<svc>.<namespace>.svc.<domain>", file=out)
    for w in lab.data.get("warnings", []):
        print(f"  warning: {w}", file=out)
    print(f"  policies: {lab.policies_dir}  (drop policy files here)", file=out)
    print(f"  registry: {lab.registry_dir}   logs: {lab.state_dir}/logs/", file=out)
    workloads = [x for x in lab.nodes if x["kind"] == "workload"]
    if workloads:
        target = workloads[0]["service"]
        client = next((x for x in workloads if x["service"] != target), workloads[0])
        print(f"  try: l7gate lab exec {client['name']} -- python -m proxy.lab.apps.client "
              f"--url http://{target}/", file=out)
    print(f"  end: l7gate lab down {lab.name}", file=out)


# -- the CLI functions ---------------------------------------------------------------------------

def up(file: str, no_agents: bool = False, *, name: str | None = None, root: str | None = None,
       wait: bool | None = None, agent_timeout: float = 20.0, out=None) -> int:
    """`l7gate lab up -f FILE [--no-agents]`. As root the lab stays up after this returns; rootless
    it lasts as long as this process, so (unless wait=False) it waits for Ctrl-C/SIGTERM."""
    out = out or sys.stdout
    err = sys.stderr if out is sys.stdout else out
    try:
        spec = load(file)
    except LabFileError as e:
        print("error: invalid lab file:\n  " + "\n  ".join(e.problems), file=err)
        return 2
    if name:
        spec.name = name
    if not rootless.inside() and os.geteuid() != 0 and spec.name in rootless.holders():
        print(f"error: lab {spec.name!r} is already up (rootless, held by pid "
              f"{rootless.holders()[spec.name]['pid']}); `l7gate lab down {spec.name}` ends it", file=err)
        return 1
    rc = rootless.privileges("l7gate lab up", lab=spec.name, out=err)
    if rc is not None:
        return rc
    if (state_root(root) / spec.name).exists():
        st = State.load(state_root(root) / spec.name)
        how = st.data.get("status", "unknown") if st else "incomplete"
        print(f"error: lab {spec.name!r} is already up (status: {how}); "
              f"`l7gate lab down {spec.name}` removes it", file=err)
        return 1
    say = lambda msg: print(f"  {msg}", file=out, flush=True)
    print(f"building lab {spec.name} from {file} ...", file=out, flush=True)
    t0 = time.monotonic()
    old_term = _term_as_interrupt()
    try:
        lab = start(spec, no_agents, root=root, progress=say, agent_timeout=agent_timeout)
    except LabExists as e:
        print(f"error: {e}", file=err)
        return 1
    except LabFileError as e:
        print("error: invalid lab file:\n  " + "\n  ".join(e.problems), file=err)
        return 2
    except LabError as e:
        print(f"error: {e}\n  (everything this `up` created was removed)", file=err)
        return 1
    except KeyboardInterrupt:
        print("interrupted: everything this `up` created was removed", file=err)
        return 130
    finally:
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
    print(f"  ({time.monotonic() - t0:.1f}s)", file=out)
    _summary(lab, no_agents, out)
    if rootless.inside() and wait is not False:
        return _hold(lab, out)
    return 0


def _term_as_interrupt():
    """While `up` builds, SIGTERM rolls back like Ctrl-C (main thread only). Returns the old handler."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def interrupt(_sig, _frame):
        raise KeyboardInterrupt
    return signal.signal(signal.SIGTERM, interrupt)


def _hold(lab: Lab, out) -> int:
    print("rootless: the lab lives as long as this command; Ctrl-C (or `l7gate lab down` from "
          "another shell) removes it", file=out, flush=True)
    got = []
    handler = lambda sig, _f: got.append(sig)
    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        while not got:
            signal.pause()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    problems = lab.down(lambda m: print(f"  {m}", file=out))
    print(f"lab {lab.name} removed" if not problems else "\n".join(problems), file=out)
    return 0 if not problems else 1


def down(name: str | None = None, *, root: str | None = None, out=None) -> int:
    """`l7gate lab down [NAME]`: remove one lab, or every lab that is up."""
    out = out or sys.stdout
    if not rootless.inside() and os.geteuid() != 0:
        return _down_rootless(name, out)
    found = [s for s in labs(state_root(root)) if name in (None, s.dir.name)]
    if not found:
        print(f"no lab named {name!r} is up" if name else "no lab is up", file=out)
        return 1 if name else 0
    rc = 0
    for st in found:
        print(f"removing lab {st.dir.name} ...", file=out, flush=True)
        problems = teardown(st.dir, lambda m: print(f"  {m}", file=out, flush=True))
        if problems:
            rc = 1
            print("  could not remove everything:\n    " + "\n    ".join(problems)
                  + f"\n  (state kept in {st.dir}; run down again)", file=out)
        else:
            print(f"lab {st.dir.name} removed", file=out)
    return rc


def _down_rootless(name: str | None, out) -> int:
    held = {k: v for k, v in rootless.holders().items() if name in (None, k)}
    if not held:
        print(f"no lab named {name!r} is up" if name else "no lab is up", file=out)
        return 1 if name else 0
    rc = 0
    for lab, ptr in held.items():
        print(f"removing rootless lab {lab} (held by pid {ptr['pid']}) ...", file=out, flush=True)
        if rootless.stop_holder(ptr):
            print(f"lab {lab} removed", file=out)
        else:
            print(f"error: pid {ptr['pid']} did not finish removing lab {lab}", file=out)
            rc = 1
    return rc


def _split(service: str) -> tuple[str | None, str]:
    lab, sep, svc = service.rpartition(":")
    return (lab or None) if sep else None, svc


def exec_(service: str, argv: list[str], *, root: str | None = None) -> int:
    """`l7gate lab exec [LAB:]SERVICE -- CMD...`: run CMD in a workload's namespace; its exit code.

    SERVICE is a workload (deathstar-1), a service (its first replica) or an external host.
    `python`/`python3` as CMD means l7gate's interpreter. No CMD: an interactive shell."""
    lab_name, svc = _split(service)
    if not rootless.inside() and os.geteuid() != 0:
        held = {k: v for k, v in rootless.holders().items() if lab_name in (None, k)}
        if len(held) == 1:
            return rootless.enter(next(iter(held.values())))
        print("error: no lab is up" if not held else
              f"error: several labs are up ({', '.join(held)}): name one, as LAB:SERVICE", file=sys.stderr)
        return 1 if not held else 2
    try:
        lab = Lab.open(lab_name, root)
        node = lab.node(svc)
    except LabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    argv = argv or [os.environ.get("SHELL", "/bin/sh")]
    try:
        return run_in(node["netns"], argv, lab=lab.name, workload=node["name"],
                      state_dir=lab.state_dir).returncode
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 127
    except KeyboardInterrupt:
        return 130


def status(*, root: str | None = None, out=None) -> int:
    """`l7gate lab status`: the labs that are up, their workloads, addresses and sidecars."""
    out = out or sys.stdout
    if not rootless.inside() and os.geteuid() != 0:
        held = rootless.holders()
        if not held:
            print("no lab is up", file=out)
            return 0
        rc = 0
        for ptr in held.values():
            rc |= rootless.enter(ptr)
        return rc
    found = labs(state_root(root))
    if not found:
        print("no lab is up", file=out)
        return 0
    for st in found:
        d = st.data
        extra = " (rootless)" if d.get("rootless") else ""
        print(f"lab {st.dir.name}: {d.get('status', 'incomplete')}{extra}, from {d.get('file', '?')}, "
              f"since {d.get('created', '?')}, sidecars {'on' if d.get('agents') else 'off'}", file=out)
        if d.get("status") != "up":
            print(f"  (not fully up: `l7gate lab down {st.dir.name}` removes what exists)", file=out)
        if d.get("nodes"):
            print_lab(Lab(st.dir, d), out, procs=True)
    return 0
