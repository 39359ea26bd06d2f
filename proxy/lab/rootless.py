"""Running the lab without root: inside `unshare --user --map-root-user --net --mount`.

As root, nothing here does anything. As another user, `privileges()` re-executes the current
command (`sys.orig_argv`) inside a new user + network + mount namespace, where it is root over
namespaces it creates. There it mounts a private tmpfs on /run (for /run/netns and the lab's
state) and makes /etc/netns writable: a tmpfs over the host's, or, when there is none, an overlay
on /etc to create it (without overlayfs it bind-mounts one resolv.conf over /etc/resolv.conf
instead). All of it is private to that process tree: the host sees nothing.

Limits (documented in lab/README.md): a rootless lab lives only as long as the process that
built it, so `l7gate lab up` stays in the foreground (Ctrl-C removes the lab); other shells reach
it through a pointer file (`$XDG_RUNTIME_DIR/l7gate-lab/<name>.json`, or /tmp/l7gate-lab-<uid>/):
`lab exec` and `lab status` enter its namespaces with nsenter, `lab down` signals it.
If neither root nor user namespaces are available, `privileges()` prints why and returns 2,
having touched nothing.
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

ENV = "L7GATE_LAB_USERNS"  # "1" in the re-executed process (inside the user namespace)
UNSHARE = ["unshare", "--user", "--map-root-user", "--net", "--mount"]
ETC_NETNS = "/etc/netns"
_mounted = False
_etc_netns_ok = True


def inside() -> bool:
    return os.environ.get(ENV) == "1"


def pointer_dir() -> Path:
    base = os.environ.get("XDG_RUNTIME_DIR")
    if base and os.path.isdir(base) and os.access(base, os.W_OK):
        return Path(base) / "l7gate-lab"
    return Path(f"/tmp/l7gate-lab-{os.getuid()}")


def missing_tools() -> list[str]:
    return [t for t in ("ip",) if shutil.which(t) is None]


def userns_available() -> tuple[bool, str]:
    if shutil.which("unshare") is None:
        return False, "the `unshare` command (util-linux) is not installed"
    try:
        r = subprocess.run([*UNSHARE, "true"], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, str(e)
    if r.returncode:
        return False, r.stderr.strip() or f"unshare exited {r.returncode}"
    return True, ""


def _mount(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["mount", *args], capture_output=True, text=True, check=False)


def setup_mounts() -> None:
    """Inside the user namespace: a private /run, and a writable /etc/netns. Once per process."""
    global _mounted, _etc_netns_ok
    if _mounted:
        return
    _mount("--make-rprivate", "/")
    r = _mount("-t", "tmpfs", "-o", "mode=755", "l7gate-run", "/run")
    if r.returncode:
        raise OSError(f"cannot mount a private /run: {r.stderr.strip()}")
    os.makedirs("/run/netns", exist_ok=True)
    resolv = os.path.realpath("/etc/resolv.conf")
    if resolv.startswith("/run/") and not os.path.exists(resolv):
        # A link into the host's /run (systemd-resolved), now hidden: give it a target, so
        # `ip netns exec` can bind a namespace's resolv.conf over it.
        os.makedirs(os.path.dirname(resolv), exist_ok=True)
        Path(resolv).write_text("")
    if os.path.isdir(ETC_NETNS):  # the host's (root-owned) /etc/netns: a private one over it
        _etc_netns_ok = _mount("-t", "tmpfs", "-o", "mode=755", "l7gate-etc-netns", ETC_NETNS).returncode == 0
    else:  # /etc/netns must be created: an overlay makes /etc writable for this process tree
        os.makedirs("/run/.l7gate-etc/upper", exist_ok=True)
        os.makedirs("/run/.l7gate-etc/work", exist_ok=True)
        r = _mount("-t", "overlay", "-o", "lowerdir=/etc,upperdir=/run/.l7gate-etc/upper,"
                   "workdir=/run/.l7gate-etc/work", "l7gate-etc", "/etc")
        _etc_netns_ok = r.returncode == 0
        if _etc_netns_ok:
            os.makedirs(ETC_NETNS, exist_ok=True)
    _mounted = True


def etc_netns_usable() -> bool:
    return _etc_netns_ok


def bind_resolv_conf(text: str) -> None:
    """Fallback without a writable /etc/netns: one resolv.conf for every namespace of the lab."""
    path = "/run/.l7gate-resolv.conf"
    Path(path).write_text(text)
    if os.path.isfile("/etc/resolv.conf"):
        _mount("--bind", path, "/etc/resolv.conf")


def _start_time(pid: int) -> int | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    f = text[text.rindex(")") + 2:].split()
    return None if f[0] in ("Z", "X") else int(f[19])


def privileges(what: str, lab: str = "", out=None) -> int | None:
    """None: go ahead (root, or already inside the user namespace, mounts ready). Otherwise the
    exit code of the re-executed command, or 2 with a message when the lab cannot run here."""
    out = out or sys.stderr
    missing = missing_tools()
    if missing:
        print(f"error: {what} needs {', '.join(missing)} (Debian: apt-get install iproute2)", file=out)
        return 2
    if inside():
        if not entered():  # nsenter'd into a lab's namespaces: its mounts are already there
            setup_mounts()
        return None
    if os.geteuid() == 0:
        return None
    ok, why = userns_available()
    if not ok:
        print(f"error: {what} needs root, or unprivileged user namespaces for a rootless lab, "
              f"and neither is available here ({why}).\n"
              "  Run it as root (sudo), or enable user namespaces "
              "(sysctl kernel.unprivileged_userns_clone=1 / user.max_user_namespaces > 0).", file=out)
        return 2
    return reexec(lab=lab)


def reexec(argv: list[str] | None = None, lab: str = "") -> int:
    """Run this command again inside a new user+net+mount namespace; return its exit code.
    With `lab`, leave a pointer so other shells can find the process holding that lab."""
    argv = argv or list(sys.orig_argv)
    env = dict(os.environ, **{ENV: "1"})
    print("note: not root: running the lab rootless, inside a user namespace "
          "(it lasts as long as this command)", file=sys.stderr)
    p = subprocess.Popen([*UNSHARE, *argv], env=env)
    ptr = None
    if lab:
        d = pointer_dir()
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        ptr = d / f"{lab}.json"
        ptr.write_text(json.dumps({"pid": p.pid, "start": _start_time(p.pid), "argv": argv}))
    forward = lambda sig, _f: p.send_signal(sig)
    old = signal.signal(signal.SIGTERM, forward)
    try:
        while True:
            try:
                return p.wait()
            except KeyboardInterrupt:  # the child got it too (same process group): let it clean up
                continue
    finally:
        signal.signal(signal.SIGTERM, old)
        if ptr is not None:
            ptr.unlink(missing_ok=True)
            try:
                ptr.parent.rmdir()  # only when no other lab of this user is up
            except OSError:
                pass


def holders() -> dict[str, dict]:
    """Rootless labs held by live processes of this user: lab name -> pointer."""
    out = {}
    d = pointer_dir()
    if not d.is_dir():
        return out
    for f in sorted(d.glob("*.json")):
        try:
            ptr = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        if ptr.get("start") is not None and _start_time(ptr["pid"]) == ptr["start"]:
            out[f.stem] = ptr
        else:
            f.unlink(missing_ok=True)  # its process is gone, and the lab with it
    return out


def enter(holder: dict, argv: list[str] | None = None) -> int:
    """Run this command again inside a rootless lab's user and mount namespaces."""
    argv = argv or list(sys.orig_argv)
    if shutil.which("nsenter") is None:
        print("error: reaching a rootless lab from another shell needs nsenter (util-linux)", file=sys.stderr)
        return 2
    env = dict(os.environ, **{ENV: "1", "L7GATE_LAB_ENTERED": "1"})
    return subprocess.call(["nsenter", "-t", str(holder["pid"]), "--user", "--mount",
                            "--preserve-credentials", *argv], env=env)


def entered() -> bool:
    """True in a command that nsenter put into an existing rootless lab (mounts already there)."""
    return os.environ.get("L7GATE_LAB_ENTERED") == "1"


def stop_holder(holder: dict, timeout: float = 15.0) -> bool:
    """Ask the process holding a rootless lab to remove it (SIGTERM), and wait for it."""
    pid, start = holder["pid"], holder["start"]
    if _start_time(pid) != start:
        return True
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _start_time(pid) != start:
            return True
        time.sleep(0.05)
    return False
