"""`l7gate demo NAME`: each demo replays its tutorial in the namespace lab with all ✔, and leaves
nothing behind — after a normal run, after Ctrl-C (or SIGTERM) at any point, and after `--keep`
followed by `lab down`. The lab tests need root; each uses its own lab name.
"""
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clitool import Output
from proxy.lab.demo import DEMOS, list_demos, names, run

ROOT = Path(__file__).resolve().parents[1]
RUN = os.getpid() % 10000
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root")


def lab_name(tag: str) -> str:
    return f"dm{tag}{RUN}"


def leftovers(name: str) -> list[str]:
    """Anything of lab `name` still there: namespaces, /etc/netns entries, its state dir, or a
    process started for it (environment L7LAB=name, or an argument under its state dir)."""
    from proxy.lab.netns import state_root
    found = []
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False).stdout
    found += [f"netns {ln.split()[0]}" for ln in out.splitlines() if ln.startswith(f"l7lab-{name}-")]
    if os.path.isdir("/etc/netns"):
        found += [f"/etc/netns/{d}" for d in os.listdir("/etc/netns") if d.startswith(f"l7lab-{name}-")]
    if (state_root() / name).exists():
        found.append(f"state dir {state_root() / name}")
    env_mark, arg_mark = f"L7LAB={name}".encode(), f"/lab/{name}/".encode()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if env_mark in env or arg_mark in cmd:
            shown = cmd.replace(b"\0", b" ").decode(errors="replace")[:120]
            found.append(f"process {pid}: {shown}")
    return found


def root_nft_tables() -> set[str]:
    r = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True, check=False)
    return set(r.stdout.splitlines()) if r.returncode == 0 else set()


# -- no root needed ------------------------------------------------------------------------------

def test_the_four_demos_are_listed():
    assert names() == ["starwars", "dns", "namespaces", "sockshop"]
    out = io.StringIO()
    assert list_demos(out) == 0
    for n in names():
        assert n in out.getvalue()


def test_unknown_demo_is_a_usage_error():
    out = io.StringIO()
    assert run("nosuch", False, out) == 2
    assert "starwars" in out.getvalue()


# -- each demo, end to end -----------------------------------------------------------------------

@root_only
@pytest.mark.parametrize("demo", names())
def test_demo_replays_the_tutorial_with_all_checks_passing(demo):
    name = lab_name(demo[:3])
    tables = root_nft_tables()
    out = io.StringIO()
    t0 = time.monotonic()
    rc = run(demo, False, out, lab_name=name)
    secs = time.monotonic() - t0
    text = out.getvalue()
    n = DEMOS[demo].checks
    assert rc == 0, text
    assert f"{n}/{n} steps as the tutorial says" in text, text
    assert text.count("✔") == n + 1 and "✘" not in text, text  # n checks + the summary
    assert text.count("$ l7gate lab exec ") == n
    assert f"lab {name} removed" in text
    assert secs < 45, f"{demo} took {secs:.1f} s"
    assert leftovers(name) == []
    assert root_nft_tables() == tables


# -- interrupted: nothing left -------------------------------------------------------------------

DEMO_IN_A_PROCESS = ("import sys\nfrom proxy.lab.demo import run\n"
                     "sys.exit(run(sys.argv[1], False, sys.stdout, lab_name=sys.argv[2]))\n")


@root_only
@pytest.mark.parametrize("when, sig", [
    ("building lab", signal.SIGINT),      # while the lab is being built
    ("[4/10]", signal.SIGINT),            # while xwing's request hangs (L3/L4 step)
    ("[7/10]", signal.SIGTERM),           # while the service-based step runs
])
def test_interrupted_demo_leaves_nothing_behind(when, sig):
    name = lab_name("i" + when.strip("[]/ ")[:2].replace("/", ""))
    tables = root_nft_tables()
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-c", DEMO_IN_A_PROCESS, "starwars", name], cwd=ROOT,
                            env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        out = Output(proc)
        assert out.until(when, 60), str(out)
        time.sleep(0.3 if when.startswith("[") else 0.05)
        proc.send_signal(sig)
        assert proc.wait(timeout=30) == 130, str(out)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = out.rest()
    assert "interrupted" in text, text
    assert leftovers(name) == [], text
    assert root_nft_tables() == tables


# -- --keep ----------------------------------------------------------------------------------------

@root_only
def test_keep_leaves_the_lab_up_and_a_second_demo_says_so_then_down_removes_it():
    from proxy.lab.commands import Lab, down
    name = lab_name("kp")
    out = io.StringIO()
    try:
        assert run("sockshop", True, out, lab_name=name) == 0, out.getvalue()
        text = out.getvalue()
        assert "--keep" in text and f"l7gate lab down {name}" in text
        assert "l7gate endpoint list" in text and "l7gate lab exec " in text
        lab = Lab.open(name)
        r = lab.client("user", "--tcp", "user-db.sock-shop.svc.cluster.local:27017", "--send", "hi",
                       timeout=2)
        assert r.stdout == "hi"  # still up, policy still in force for user
        assert any(x.startswith("netns ") for x in leftovers(name))

        again = io.StringIO()
        assert run("sockshop", False, again, lab_name=name) == 1
        assert "already up" in again.getvalue()
        assert Lab.open(name).client("user", "--tcp", "user-db.sock-shop.svc.cluster.local:27017",
                                     "--send", "hi", timeout=2).stdout == "hi"  # untouched
    finally:
        gone = io.StringIO()
        rc = down(name, out=gone)
    assert rc == 0, gone.getvalue()
    assert leftovers(name) == []


@root_only
def test_a_step_that_differs_from_the_tutorial_is_marked_and_fails_the_demo(monkeypatch):
    from proxy.lab.demo.scenarios import Check, Demo, Stage, body
    name = lab_name("wr")
    wrong = Demo("sockshop", "wrong on purpose", "test", "lab/sockshop.yaml", (
        Stage("no policy", (), (
            Check("rogue-1 -> user-db", "rogue-1",
                  ("--tcp", "user-db.sock-shop.svc.cluster.local:27017", "--send", "ping"),
                  "pong (wrong on purpose)", body("pong")),
            Check("user -> user-db", "user",
                  ("--tcp", "user-db.sock-shop.svc.cluster.local:27017", "--send", "ping"),
                  "ping", body("ping")),
        )),))
    monkeypatch.setitem(DEMOS, "sockshop", wrong)
    out = io.StringIO()
    assert run("sockshop", False, out, lab_name=name) == 1
    text = out.getvalue()
    assert "1/2 steps as the tutorial says (✘: 1)" in text, text
    assert "actual:   ping" in text and "✘" in text
    assert leftovers(name) == []


# -- without root --------------------------------------------------------------------------------

NOBODY = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups", "env"]


def _python_for_nobody():
    """An interpreter user nobody can run with proxy importable (as tests/test_lab.py), or None."""
    import shutil
    if shutil.which("setpriv") is None:
        return None
    site = next((p for p in sys.path if p.endswith("site-packages") and os.path.isdir(p)), "")
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": "/tmp",
           "PYTHONPATH": os.pathsep.join([str(ROOT), site])}
    version = f"python{sys.version_info[0]}.{sys.version_info[1]}"
    for py in (sys.executable, f"/usr/bin/{version}", f"/usr/local/bin/{version}"):
        if os.path.exists(py) and subprocess.run(
                [*NOBODY, py, "-c", "import proxy.lab.demo, dnslib, yaml"], env=env,
                capture_output=True, check=False).returncode == 0:
            return py, env
    return None


@root_only
def test_demo_as_an_unprivileged_user_runs_rootless_or_says_why():
    found = _python_for_nobody()
    if found is None:
        pytest.skip("no interpreter user nobody can run with l7gate importable")
    py, env = found
    name = lab_name("rl")
    r = subprocess.run([*NOBODY, py, "-c", DEMO_IN_A_PROCESS, "sockshop", name], env=env, cwd="/",
                       capture_output=True, text=True, timeout=60, check=False)
    userns = subprocess.run([*NOBODY, "unshare", "--user", "--map-root-user", "--net", "--mount",
                             "true"], capture_output=True, check=False).returncode == 0
    if userns:
        assert r.returncode == 0, r.stdout + r.stderr
        assert "4/4 steps as the tutorial says" in r.stdout
    else:
        assert r.returncode == 2 and "needs root" in r.stdout, r.stdout + r.stderr
    assert leftovers(name) == []
    # Neither root nor user namespaces (no `unshare` on PATH): a clear message, nothing touched.
    bare = Path(f"/tmp/l7demo-noshare-{RUN}")
    bare.mkdir(exist_ok=True)
    try:
        (bare / "ip").unlink(missing_ok=True)
        (bare / "ip").symlink_to(subprocess.run(["sh", "-c", "command -v ip"], capture_output=True,
                                                text=True, check=True).stdout.strip())
        r = subprocess.run([*NOBODY, f"PATH={bare}", py, "-c", DEMO_IN_A_PROCESS, "sockshop", name],
                           env=env, cwd="/", capture_output=True, text=True, timeout=30, check=False)
        assert r.returncode == 2, r.stdout + r.stderr
        assert "needs root, or unprivileged user namespaces" in r.stdout
        assert leftovers(name) == []
    finally:
        import shutil
        shutil.rmtree(bare, ignore_errors=True)
