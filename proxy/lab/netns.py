"""The executor: performs a plan's steps with `ip`, and undoes exactly what it did.

State lives in `<state root>/<lab>/` (default `/run/l7gate/lab/<lab>/`): `state.json`, the lab's
`policies/` and `registry/` (shared by its sidecars), `logs/` (one file per process), `zone.json`
and `endpoints.yaml` (the lab as `l7gate trace --endpoints` reads it).

Crash safety: every resource outside the state dir (a network namespace, a file under
/etc/netns, a directory it had to create, a process) is appended to `state.json` *before* it is
created (atomic rewrite, fsync), and a process's PID and start time right after it is spawned.
`teardown` walks that list backwards and removes only what is recorded: processes by PID, and
only while their start time still matches (a recycled PID is never signalled); namespaces by
name. So `down` after an `up` killed at any point removes everything, and never anything else.
Claiming the lab is `mkdir` of its state dir: two `up`s of one lab cannot both win.

Never: touches the root network namespace, signals a process it did not record, deletes a
namespace it did not create.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from proxy.lab.topology import Plan, Step

DEFAULT_STATE_ROOT = "/run/l7gate/lab"
NETNS_RUN = "/run/netns"
STATE_FILE = "state.json"
STATE_VERSION = 1
ETC_MARKER = ".l7gate-lab"  # in /etc/netns when a lab created it

# Popen objects of processes this process spawned: polled on teardown so they do not linger as
# zombies when up and down run in one process (the demos, the tests).
_children: dict[int, subprocess.Popen] = {}


class LabError(Exception):
    """A user-facing failure; the message says what happened and what to do."""


class LabExists(LabError):
    pass


def state_root(root: str | os.PathLike | None = None) -> Path:
    return Path(root or os.environ.get("L7GATE_LAB_ROOT") or DEFAULT_STATE_ROOT)


def project_root() -> str:
    """The directory holding the `proxy` package (so `python -m proxy...` works in any cwd)."""
    return str(Path(__file__).resolve().parents[2])


def child_env(lab: str = "", workload: str = "", state_dir: str = "") -> dict[str, str]:
    env = dict(os.environ)
    root = project_root()
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    if lab:
        env["L7LAB"] = lab
        env["L7LAB_STATE"] = state_dir
    if workload:
        env["L7LAB_WORKLOAD"] = workload
    return env


# -- state -------------------------------------------------------------------------------------

class State:
    def __init__(self, dir: Path, data: dict) -> None:
        self.dir = dir
        self.data = data

    @property
    def path(self) -> Path:
        return self.dir / STATE_FILE

    @property
    def resources(self) -> list[dict]:
        return self.data.setdefault("resources", [])

    def save(self) -> None:
        tmp = self.dir / f".{STATE_FILE}.{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(self.data, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def record(self, res: dict) -> dict:
        self.resources.append(res)
        self.save()
        return res

    @classmethod
    def claim(cls, dir: Path, data: dict) -> State:
        dir.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.mkdir(dir, 0o755)
        except FileExistsError:
            existing = cls.load(dir)
            how = existing.data.get("status", "unknown") if existing else "incomplete"
            raise LabExists(f"lab {dir.name!r} is already up (status: {how}; state in {dir}). "
                            f"Remove it first with `l7gate lab down {dir.name}`.") from None
        st = cls(dir, {"version": STATE_VERSION, **data, "resources": []})
        st.save()
        return st

    @classmethod
    def load(cls, dir: Path) -> State | None:
        try:
            return cls(dir, json.loads((dir / STATE_FILE).read_text()))
        except (OSError, ValueError):
            return None


# -- processes ---------------------------------------------------------------------------------

def proc_start_time(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat (start time in clock ticks); None if gone or a zombie."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def alive(res: dict) -> bool:
    pid = res.get("pid")
    if not pid:
        return False
    child = _children.get(pid)
    if child is not None and child.poll() is not None:
        return False
    return proc_start_time(pid) == res.get("start")


def log_tail(path: str, lines: int = 12) -> str:
    try:
        text = Path(path).read_text(errors="replace").rstrip().splitlines()
    except OSError:
        return "(no log)"
    return "\n".join("    " + ln for ln in text[-lines:]) or "    (empty log)"


def spawn(netns: str, argv: list[str], log: str, env: dict, cwd: str) -> subprocess.Popen:
    """Start argv in `netns`, held at a gate: the caller records the PID, then calls `release`.

    The child waits for a line on stdin before it execs (`ip netns exec`, then the app: PID and
    start time stay the same). If the caller dies before releasing it, the pipe closes, `read`
    fails and the child exits without running anything: no process escapes the state file."""
    with open(log, "ab") as logf:
        p = subprocess.Popen(["sh", "-c", 'read -r _ && exec "$@"', "l7lab-gate",
                              "ip", "netns", "exec", netns, *argv], stdin=subprocess.PIPE,
                             stdout=logf, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                             start_new_session=True)  # Ctrl-C on `up`'s terminal must not reach it
    _children[p.pid] = p
    return p


def release(p: subprocess.Popen) -> None:
    try:
        p.stdin.write(b"go\n")
        p.stdin.close()
    except BrokenPipeError:
        pass  # it died already; readiness checks report it


def _listening(pid: int, port: int, proto: str) -> bool:
    """Is `port` open in PID's network namespace? (/proc/PID/net/* shows that namespace.)"""
    proto = proto.upper()
    kinds = {"TCP": ("tcp", "tcp6"), "UDP": ("udp", "udp6"), "SCTP": ()}[proto]
    if not kinds:  # no /proc table for SCTP: trust the process
        return True
    for kind in kinds:
        try:
            lines = Path(f"/proc/{pid}/net/{kind}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if int(f[1].rsplit(":", 1)[1], 16) == port and (proto == "UDP" or f[3] == "0A"):
                return True
    return False


# -- executor ----------------------------------------------------------------------------------

def _ip_batch(netns: str, lines: list[str]) -> None:
    r = subprocess.run(["ip", "-n", netns, "-batch", "-"], input="\n".join(lines) + "\n",
                       capture_output=True, text=True, check=False)
    if r.returncode:
        raise LabError(f"ip -n {netns}: {r.stderr.strip() or r.stdout.strip()}")


class Executor:
    """Performs steps in order, recording each resource in the state before creating it."""

    def __init__(self, plan: Plan, state: State, progress=None, cwd: str | None = None) -> None:
        self.plan = plan
        self.state = state
        self.progress = progress or (lambda msg: None)
        self.cwd = cwd or (str(Path(plan.file).resolve().parent) if plan.file else "/")
        self.procs: dict[str, dict] = {}  # proc id -> its resource record

    def run(self, steps: list[Step], stop_after: int | None = None) -> None:
        """Perform `steps`; with `stop_after=N`, only the first N (tests: a crash midway)."""
        for i, step in enumerate(steps):
            if stop_after is not None and i >= stop_after:
                return
            getattr(self, f"_do_{step.kind}")(**step.args)

    def _do_statedir(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)

    def _do_statefile(self, path: str, content: str) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = f"{path}.tmp"
        Path(tmp).write_text(content)
        os.replace(tmp, path)

    def _do_netns(self, name: str) -> None:
        if os.path.exists(f"{NETNS_RUN}/{name}"):
            raise LabError(f"network namespace {name} already exists and is not this lab's: "
                           "remove it or choose another lab name")
        self.state.record({"kind": "netns", "name": name})
        r = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True, check=False)
        if r.returncode:
            raise LabError(f"ip netns add {name}: {r.stderr.strip()}")

    def _do_ip(self, netns: str, lines: list[str]) -> None:
        _ip_batch(netns, lines)

    def _do_sysctl(self, netns: str, key: str, value: str, optional: bool = False) -> None:
        path = "/proc/sys/" + key.replace(".", "/")
        r = subprocess.run(["ip", "netns", "exec", netns, "sh", "-c", f'echo {value} > "{path}"'],
                           capture_output=True, text=True, check=False)
        if r.returncode and not optional:
            raise LabError(f"sysctl {key} in {netns}: {r.stderr.strip()}")

    def _do_etcdir(self, path: str, shared: bool = False) -> None:
        if os.path.isdir(path):
            return  # not ours: left alone by teardown
        self.state.record({"kind": "dir", "path": path, "shared": shared})
        os.makedirs(path)
        if shared:  # several labs may use it: whichever is removed last removes it (marker)
            Path(path, ETC_MARKER).write_text("created by l7gate lab; removed with the last lab\n")

    def _do_file(self, path: str, content: str) -> None:
        self.state.record({"kind": "file", "path": path})
        Path(path).write_text(content)

    def _do_policies(self, src: str, dst: str) -> None:
        os.makedirs(dst, exist_ok=True)
        if src:
            shutil.copytree(src, dst, dirs_exist_ok=True)

    def _do_publish(self, record: dict, registry: str) -> None:
        from proxy.agent.registry import EndpointRecord, Registry
        from proxy.policy.identity import IdentityAllocator

        reg = Registry(registry)
        rec = EndpointRecord(**record)
        ids = IdentityAllocator(reserve=reg.reserve_identity)
        rec.identity = ids.for_labels(rec.endpoint().label_set()).id
        reg.publish(rec)

    def _do_spawn(self, id: str, netns: str, argv: list[str], log: str) -> None:
        node = id.split("/", 1)[0]
        res = self.state.record({"kind": "proc", "id": id, "netns": netns, "argv": argv,
                                 "log": log, "pid": None, "start": None})
        p = spawn(netns, argv, log, child_env(self.plan.name, node, self.plan.state_dir), self.cwd)
        res["pid"] = p.pid
        res["start"] = proc_start_time(p.pid)  # with the PID, identifies it for teardown
        self.state.save()
        release(p)  # recorded: now it may run
        self.procs[id] = res

    def _dead(self, id: str) -> LabError:
        res = self.procs[id]
        return LabError(f"{id} exited during start-up: {' '.join(res['argv'])}\n"
                        f"  its log ({res['log']}):\n{log_tail(res['log'])}")

    def _do_wait_ports(self, procs: dict[str, list], timeout: float) -> None:
        pending = {pid: [tuple(p) for p in ports] for pid, ports in procs.items()}
        deadline = time.monotonic() + timeout
        while pending:
            for id in list(pending):
                res = self.procs[id]
                if not alive(res):
                    raise self._dead(id)
                pending[id] = [(port, proto) for port, proto in pending[id]
                               if not _listening(res["pid"], port, proto)]
                if not pending[id]:
                    del pending[id]
            if not pending:
                break
            if time.monotonic() > deadline:
                what = "; ".join(f"{id}: {', '.join(f'{p}/{pr}' for p, pr in ports)}"
                                 for id, ports in pending.items())
                raise LabError(f"not listening after {timeout:g}s: {what}")
            time.sleep(0.02)

    def _do_wait_files(self, procs: dict[str, str], timeout: float) -> None:
        pending = dict(procs)
        deadline = time.monotonic() + timeout
        if pending:
            self.progress(f"waiting for {len(pending)} sidecar(s) to publish their endpoint")
        while pending:
            for id, path in list(pending.items()):
                if os.path.exists(path):
                    del pending[id]
                elif not alive(self.procs[id]):
                    raise self._dead(id)
            if not pending:
                break
            if time.monotonic() > deadline:
                names = ", ".join(sorted(pending))
                first = self.procs[next(iter(sorted(pending)))]
                raise LabError(f"sidecar(s) not ready after {timeout:g}s (no ready marker in the "
                               f"registry): {names}\n  log of {first['id']} ({first['log']}):\n"
                               f"{log_tail(first['log'])}")
            time.sleep(0.05)


# -- teardown ----------------------------------------------------------------------------------

def netns_pids(name: str) -> list[int]:
    r = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True, check=False)
    return [int(x) for x in r.stdout.split()] if r.returncode == 0 else []


def stop_processes(procs: list[dict], grace: float = 3.0) -> int:
    """SIGTERM the recorded processes still alive (PID and start time match), SIGKILL after
    `grace` seconds. Returns how many were running."""
    running = [r for r in procs if alive(r)]
    for r in running:
        try:
            os.kill(r["pid"], signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(alive(r) for r in running):
        time.sleep(0.02)
    for r in running:
        if alive(r):
            try:
                os.kill(r["pid"], signal.SIGKILL)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline and any(alive(r) for r in running):
        time.sleep(0.02)
    for r in procs:  # reap the ones this process spawned (up and down in one process)
        child = _children.pop(r.get("pid"), None)
        if child is not None:
            try:
                child.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                pass
    return len(running)


def teardown(dir: Path, progress=None) -> list[str]:
    """Remove everything recorded in `dir`'s state, then the state dir. Returns problems (empty
    when all is gone; the state dir is kept then, so `down` can be retried)."""
    say = progress or (lambda msg: None)
    problems: list[str] = []
    st = State.load(dir)
    if st is None:
        if dir.exists():
            shutil.rmtree(dir, ignore_errors=True)  # claimed, nothing recorded yet
        return problems
    st.data["status"] = "removing"
    try:
        st.save()
    except OSError:
        pass
    res = list(reversed(st.resources))
    procs = [r for r in res if r["kind"] == "proc"]
    n = stop_processes(procs)
    if n:
        say(f"stopped {n} process(es)")
    for r in procs:
        if alive(r):
            problems.append(f"process {r['pid']} ({r['id']}) did not exit")
    removed = 0
    for r in res:
        if r["kind"] != "netns":
            continue
        if not os.path.exists(f"{NETNS_RUN}/{r['name']}"):
            continue
        strangers = netns_pids(r["name"])
        if strangers:
            say(f"note: {r['name']} still holds processes the lab did not start "
                f"({', '.join(map(str, strangers))}); the namespace ends when they exit")
        out = subprocess.run(["ip", "netns", "del", r["name"]], capture_output=True, text=True, check=False)
        if out.returncode:
            problems.append(f"ip netns del {r['name']}: {out.stderr.strip()}")
        else:
            removed += 1
    if removed:
        say(f"removed {removed} network namespace(s)")
    for r in res:
        try:
            if r["kind"] == "file":
                Path(r["path"]).unlink(missing_ok=True)
            elif r["kind"] == "dir" and not r.get("shared"):
                os.rmdir(r["path"])
        except FileNotFoundError:
            pass
        except OSError as e:
            problems.append(f"{r['path']}: {e.strerror}")
    etc = st.data.get("etc_netns")
    if etc:  # /etc/netns as a lab created it, now holding nothing but the marker: remove it
        try:
            if os.listdir(etc) == [ETC_MARKER]:
                os.unlink(os.path.join(etc, ETC_MARKER))
                os.rmdir(etc)
        except OSError:
            pass
    if problems:
        st.data["status"] = "failed"
        st.data.setdefault("problems", []).extend(problems)
        st.save()
    else:
        shutil.rmtree(dir, ignore_errors=True)
    return problems


def labs(root: Path) -> list[State]:
    out = []
    if root.is_dir():
        for d in sorted(root.iterdir()):
            if d.is_dir():
                out.append(State.load(d) or State(d, {"name": d.name, "status": "incomplete"}))
    return out


def run_in(netns: str, argv: list[str], *, lab: str = "", workload: str = "", state_dir: str = "",
           timeout: float | None = None, capture: bool = False, input: str | None = None
           ) -> subprocess.CompletedProcess:
    """Run argv inside a lab namespace (`python`/`python3` = this interpreter, which can import
    proxy). With capture, stdout/stderr come back as text."""
    if argv and argv[0] in ("python", "python3"):
        argv = [sys.executable, *argv[1:]]
    return subprocess.run(["ip", "netns", "exec", netns, *argv], env=child_env(lab, workload, state_dir),
                          timeout=timeout, capture_output=capture, text=capture or input is not None,
                          input=input, check=False)
