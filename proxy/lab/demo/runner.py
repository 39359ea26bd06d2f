"""`l7gate demo NAME`: build the demo's workloads, replay the tutorial's steps, print what each gives.

The workloads are the demo's namespace lab (`LabWorkloads`), or with `--compose` its
docker-compose stack (`proxy.docker.demo`): `Replay` only talks to them through `Workloads`
(build, remove, the policies directory, ask the sidecars, run a command inside a workload).

Per check it prints the title and the command as a user would type it *before* running it, then
the tutorial's outcome, the actual one and ✔/✘. While a request is pending (a hang takes the
client's whole --timeout) a TTY shows the elapsed seconds on one line; other outputs get one
plain "waiting" line. The workloads are always removed at the end (Ctrl-C, SIGTERM/SIGHUP and
errors included) unless --keep, which leaves them up after the last step and says how to explore.

Policies: each stage empties the policies directory and copies its files in (atomically:
a hidden temporary name, then rename), then asks every sidecar over its control socket
(`policy get`) until all report exactly the stage's policies; an agent answers only between
syncs, so by then its nftables table is the new one. When a stage's policies have the same
names as the previous stage's (the namespaces steps, the DNS steps), the directory is emptied
and confirmed empty first, so "in force" cannot be the previous version.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Protocol

from proxy.lab import rootless
from proxy.lab.demo.scenarios import DEMOS, Check, Demo, Stage
from proxy.lab.netns import (
    LabError,
    LabExists,
    State,
    child_env,
    labs,
    project_root,
    state_root,
    teardown,
)

CLIENT = ("python", "-m", "proxy.lab.apps.client")
CLIENT_TIMEOUT = 2.0  # a hang is recognised after this long
SYNC_TIMEOUT = 10.0  # the sidecars confirm a policy change within this (normally < 1 s)


def names() -> list[str]:
    return list(DEMOS)


def list_demos(out=None) -> int:
    """`l7gate demo --list`."""
    out = out or sys.stdout
    width = max(map(len, DEMOS))
    for d in DEMOS.values():
        print(f"{d.name.ljust(width)}  {d.title} ({d.checks} steps; {d.seed})", file=out)
    return 0


def run(name: str, keep: bool = False, out=None, *, lab_name: str | None = None,
        root: str | None = None, timeout: float = CLIENT_TIMEOUT) -> int:
    """`l7gate demo NAME [--keep]`: 0 when every step gives what the tutorial says, 1 when one
    does not (or the lab fails), 2 for a usage problem (unknown demo, no privileges), 130 when
    interrupted. `lab_name` overrides the lab's name (default: the demo's name)."""
    out = out or sys.stdout
    demo = DEMOS.get(name)
    if demo is None:
        print(f"error: no demo named {name!r}; the demos are: {', '.join(DEMOS)}", file=out)
        return 2
    lab_name = lab_name or demo.name
    lab_file = Path(project_root()) / demo.lab_file
    if not lab_file.is_file():
        print(f"error: {lab_file} is missing: `l7gate demo` runs from a clone of the repository "
              "(it needs lab/ and policies/)", file=out)
        return 2
    if not rootless.inside() and os.geteuid() != 0 and lab_name in rootless.holders():
        print(f"error: lab {lab_name!r} is already up (rootless, held by pid "
              f"{rootless.holders()[lab_name]['pid']}); `l7gate lab down {lab_name}` ends it, "
              "then run the demo again", file=out)
        return 1
    rc = rootless.privileges("l7gate demo", lab=lab_name, out=out)
    if rc is not None:
        return rc
    dir = state_root(root) / lab_name
    if dir.exists():
        st = State.load(dir)
        how = st.data.get("status", "unknown") if st else "incomplete"
        print(f"error: lab {lab_name!r} is already up (status: {how}), maybe from an earlier "
              f"`l7gate demo {name} --keep`; explore it with `l7gate lab exec SERVICE -- ...`, "
              f"or remove it with `l7gate lab down {lab_name}` and run the demo again", file=out)
        return 1
    return Replay(demo, LabWorkloads(lab_name, lab_file, root, out), keep, out, timeout).main()


# -- signals -------------------------------------------------------------------------------------

def _interrupt(_sig, _frame):
    raise KeyboardInterrupt


@contextmanager
def _interruptible():
    """Ctrl-C, SIGTERM and SIGHUP all mean: stop, remove the lab (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.signal(s, _interrupt) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@contextmanager
def _uninterruptible():
    """While the lab is being removed: a second Ctrl-C must not leave half of it behind."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


# -- the run -------------------------------------------------------------------------------------

def shown_path(p: Path) -> str:
    """A path as the user would type it: relative to the current directory when under it."""
    try:
        rel = os.path.relpath(p)
    except ValueError:
        return str(p)
    return str(p) if rel.startswith("..") else rel


def _policy_refs(paths: list[Path]) -> set[tuple]:
    from proxy.policy.load import load_paths
    refs = set()
    for doc in load_paths([str(p) for p in paths]).documents:
        if getattr(doc, "policy", None) is not None:
            r = doc.policy.ref
            refs.add((r.kind, r.namespace, r.name))
    return refs


def other_policy(demo: Demo) -> str | None:
    """A policy of the demo that is not in force at its end, as the --keep hints show it (a
    file, or a directory's files as `DIR/*`), or None."""
    last = demo.stages[-1].policies
    other = next((p for s in demo.stages for p in s.policies if p not in last), None)
    if other is None:
        return None
    src = Path(project_root()) / "policies" / other
    return shown_path(src) + ("/*" if src.is_dir() else "")


class Workloads(Protocol):
    """Where a demo's workloads run and how the replay reaches them: the namespace lab
    (`LabWorkloads`) or a docker-compose stack (`proxy.docker.demo.ComposeWorkloads`)."""

    noun: str  # "lab" or "stack", in messages

    def build(self, say: Callable[[str], None]) -> int:
        """Bring the workloads and their sidecars up, saying what happens; 0, or the exit code."""

    def remove(self, say: Callable[[str], None]) -> None:
        """Remove what `build` created (also after a failed or interrupted build)."""

    def policies_dir(self) -> Path:
        """The directory every sidecar reads its policies from."""

    def agents(self) -> list[str]:
        """The names of the enforced workloads (one sidecar each)."""

    def policies_in_force(self) -> dict[str, dict]:
        """Each answering sidecar's `policy get`."""

    def ip(self, workload: str) -> str:
        """The workload's address."""

    def command(self, workload: str, argv: list[str]) -> tuple[list[str], dict | None]:
        """What runs `argv` (argv[0] is `python`) inside the workload, and its environment."""

    def shown(self, workload: str, argv: list[str]) -> str:
        """The same command as a user would type it."""

    def logs(self) -> str:
        """Where the sidecars' logs are (for a warning)."""

    def keep_hint(self, demo: Demo) -> str:
        """After a failed run without --keep: how to keep the workloads up to look into them."""

    def keep(self, demo: Demo, say: Callable[[str], None]) -> bool:
        """--keep: say how to explore; False when the workloads must be removed now after all."""


class LabWorkloads:
    """The namespace lab of `lab_file` (proxy.lab): `ip netns exec`, the registry in /run."""

    noun = "lab"

    def __init__(self, lab_name: str, lab_file: Path, root: str | None, out) -> None:
        self.lab_name = lab_name
        self.lab_file = lab_file
        self.root = root
        self.out = out
        self.lab = None
        self.building = False
        self.prefix = ""  # "LAB:" in `lab exec` commands when several labs are up

    def build(self, say) -> int:
        from proxy.lab.commands import print_lab, start
        from proxy.lab.spec import LabFileError
        say(f"building lab {self.lab_name} from {shown_path(self.lab_file)} "
            f"(workloads with their sidecars) ...")
        t0 = time.monotonic()
        self.building = True  # an interrupt now: start() removes what it built
        try:
            self.lab = start(self.lab_file, name=self.lab_name, root=self.root)
        except LabExists as e:
            self.building = False
            say(f"error: {e}")
            return 1
        except LabFileError as e:
            self.building = False
            say("error: invalid lab file:\n  " + "\n  ".join(e.problems))
            return 2
        except LabError as e:
            self.building = False
            say(f"error: {e}\n  (everything the demo created was removed)")
            return 1
        self.building = False
        say(f"lab {self.lab_name} is up ({time.monotonic() - t0:.1f} s):")
        print_lab(self.lab, self.out)
        if len(labs(state_root(self.root))) > 1:
            self.prefix = f"{self.lab_name}:"
        return 0

    def remove(self, say) -> None:
        dir = state_root(self.root) / self.lab_name
        if self.lab is None:
            # start() removes what it built when it fails or is interrupted; this covers an
            # interrupt that landed between its return and the assignment.
            st = State.load(dir)
            if st is None or st.data.get("pid") != os.getpid():
                if self.building:
                    say(f"the partly built lab {self.lab_name} was removed")
                return
        say(f"removing lab {self.lab_name} ...")
        problems = teardown(dir)
        if problems:
            say("  could not remove everything:\n    " + "\n    ".join(problems)
                + f"\n  (`l7gate lab down {self.lab_name}` retries)")
        else:
            say(f"lab {self.lab_name} removed")

    def policies_dir(self) -> Path:
        return Path(self.lab.policies_dir)

    def agents(self) -> list[str]:
        return [n["name"] for n in self.lab.nodes if n["kind"] != "external" and n.get("enforce")]

    def policies_in_force(self) -> dict[str, dict]:
        from proxy.agent import control
        return dict(control.ask_all(self.lab.registry_dir, "policy get"))

    def ip(self, workload: str) -> str:
        return self.lab.ip(workload)

    def command(self, workload: str, argv: list[str]) -> tuple[list[str], dict | None]:
        node = self.lab.node(workload)
        return (["ip", "netns", "exec", node["netns"], sys.executable, *argv[1:]],
                child_env(self.lab.name, node["name"], self.lab.state_dir))

    def shown(self, workload: str, argv: list[str]) -> str:
        return f"l7gate lab exec {self.prefix}{workload} -- {shlex.join(argv)}"

    def logs(self) -> str:
        return f"logs: {self.lab.state_dir}/logs/"

    def keep_hint(self, demo: Demo) -> str:
        return (f"(`l7gate demo {demo.name} --keep` leaves the lab up to look into: "
                "`l7gate lab status`, the sidecars' logs)")

    def keep(self, demo: Demo, say) -> bool:
        self._explore(demo, say)
        if rootless.inside():
            self._hold(say)
            return False
        return True

    def _explore(self, demo: Demo, say) -> None:
        lab = self.lab
        pfx = self.prefix
        pdir = lab.policies_dir
        rootless_lab = rootless.inside()
        say(f"\n--keep: lab {lab.name} stays up. Explore it:")
        say("  l7gate lab status")
        for ex in demo.explore:
            say(f"  l7gate lab exec {pfx}{ex}")
        say(f"  l7gate lab exec {pfx}SERVICE -- sh    (a shell inside a workload)")
        if rootless_lab:  # its /run is private: reach the registry from inside the lab
            say(f"  l7gate lab exec {pfx}{self.agents()[0]} -- python -m proxy.cli endpoint list "
                f"--registry {lab.registry_dir}    (also: observe, policy get, identity list, "
                "fqdn cache list)")
        else:
            say(f"  L7GATE_REGISTRY={lab.registry_dir} l7gate endpoint list    "
                "(also: policy get, identity list, fqdn cache list)")
            say(f"  L7GATE_REGISTRY={lab.registry_dir} l7gate observe --last 50    "
                "(the flows behind each step; --follow, --verdict DROPPED, -o json)")
        shown = other_policy(demo)
        if shown:
            cmd = f"rm -f {pdir}/* && cp {shown} {pdir}/"
            what = "another policy: the sidecars apply it within a second"
        else:
            cmd = f"rm -f {pdir}/*"
            what = "back to no policy: the sidecars apply it within a second"
        if rootless_lab:
            cmd = f"l7gate lab exec {pfx}{self.agents()[0]} -- sh -c '{cmd}'"
        say(f"  {cmd}    ({what})")
        say(f"  l7gate lab down {lab.name}    (removes it)")

    @staticmethod
    def _hold(say) -> None:
        say("rootless: the lab lives as long as this command (its files are private to it); "
            "other shells reach it with `l7gate lab exec`. Ctrl-C (or `l7gate lab down` "
            "from another shell) removes it.")
        try:
            while True:
                signal.pause()
        except KeyboardInterrupt:  # Ctrl-C / SIGTERM / SIGHUP: main() removes the lab
            say("")


class Replay:
    """One demo replayed on its workloads: stage by stage, check by check, then removed."""

    def __init__(self, demo: Demo, workloads: Workloads, keep: bool, out, timeout: float) -> None:
        self.demo = demo
        self.w = workloads
        self.keep = keep
        self.out = out
        self.timeout = timeout
        self.tty = bool(getattr(out, "isatty", lambda: False)())
        self.color = self.tty and not os.environ.get("NO_COLOR")
        self.refs: set[tuple] = set()  # the policies in force (as the sidecars confirmed)
        self.passed = 0
        self.done = 0
        self.failed: list[int] = []

    # -- output ----------------------------------------------------------------------------------
    def say(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    def _paint(self, text: str, code: str) -> str:
        return f"\033[{code}m{text}\033[0m" if self.color else text

    def _ticker(self, label: str, t0: float, state: dict) -> None:
        """Progress while waiting: elapsed seconds on one line (TTY), or one plain line."""
        elapsed = time.monotonic() - t0
        if elapsed < 0.4:
            return
        if self.tty:
            self.out.write(f"\r      {label} {elapsed:4.1f} s")
            self.out.flush()
            state["dirty"] = True
        elif not state.get("said"):
            self.say(f"      {label} ...")
            state["said"] = True

    def _clear_ticker(self, state: dict) -> None:
        if state.get("dirty"):
            self.out.write("\r\033[K")
            self.out.flush()

    # -- main ------------------------------------------------------------------------------------
    def main(self) -> int:
        t0 = time.monotonic()
        kept = False
        rc = 1
        with _interruptible():
            try:
                rc = self._build()
                if rc == 0:
                    self._stages()
                    total = self.demo.checks
                    ok = self.passed == total
                    mark = self._paint("✔", "32") if ok else self._paint("✘", "31")
                    failed = "" if ok else " (✘: " + ", ".join(map(str, self.failed)) + ")"
                    self.say(f"\n{mark} {self.passed}/{total} steps as the tutorial says{failed} "
                             f"({time.monotonic() - t0:.1f} s)")
                    if not ok and not self.keep:
                        self.say("  " + self.w.keep_hint(self.demo))
                    rc = 0 if ok else 1
                    if self.keep:
                        kept = self.w.keep(self.demo, self.say)
            except KeyboardInterrupt:
                if self.tty:
                    self.out.write("\r\033[K")
                self.say(f"\ninterrupted ({self.done}/{self.demo.checks} steps run)")
                rc = 130
                kept = False
            except (LabError, OSError, subprocess.SubprocessError) as e:
                self.say(f"\nerror: {e}")
                rc = 1
                kept = False
            finally:
                if not kept:
                    with _uninterruptible():
                        self.w.remove(self.say)
        return rc

    def _build(self) -> int:
        d = self.demo
        self.say(f"l7gate demo {d.name}: {d.title}")
        self.say(f"  ({d.seed}; {d.checks} steps)")
        rc = self.w.build(self.say)
        if rc == 0:
            self.say(f"  each request runs inside its workload with --timeout {self.timeout:g}: a "
                     f"hang shows as TIMEOUT after {self.timeout:g} s")
        return rc

    # -- stages ----------------------------------------------------------------------------------
    def _stages(self) -> None:
        n = 0
        for i, stage in enumerate(self.demo.stages, 1):
            self.say(f"\n== {i}/{len(self.demo.stages)} {stage.title}")
            self._apply(stage)
            if stage.note:
                self.say(f"   note: {stage.note}")
            for check in stage.checks:
                n += 1
                self._check(n, check)

    def _apply(self, stage: Stage) -> None:
        pdir = self.w.policies_dir()
        srcs = [Path(project_root()) / "policies" / p for p in stage.policies]
        files = []
        for s in srcs:
            files += sorted(f for f in s.iterdir() if f.suffix in (".yaml", ".yml", ".json")) \
                if s.is_dir() else [s]
        want = _policy_refs(files) if files else set()
        shown_dir = shown_path(pdir)
        if not files:
            self.say(f"   (no policy: the {self.w.noun}'s policies directory {shown_dir}/ is empty)")
        else:
            shown = " ".join(shown_path(f) for f in files)
            self.say(f"   $ rm -f {shown_dir}/* && cp {shown} {shown_dir}/")
        if files and want == self.refs:
            # Same policy names as now in force: make the agents drop them first, so that
            # "they report these names" below means the new version.
            self._clear(pdir)
            self._wait_sync(set(), "removing the previous version")
        self._clear(pdir)
        for f in files:
            tmp = pdir / f".{f.name}.tmp"
            shutil.copyfile(f, tmp)
            os.replace(tmp, pdir / f.name)
        if want or self.refs:
            secs = self._wait_sync(want, "waiting for the sidecars")
            if secs is not None:
                n = len(self.w.agents())
                what = "in force" if want else "no policy any more"
                self.say(f"   {what} on all {n} sidecars after {secs:.1f} s")

    @staticmethod
    def _clear(pdir: Path) -> None:
        for old in pdir.iterdir():
            if old.is_file() or old.is_symlink():
                old.unlink()
            elif old.is_dir():
                shutil.rmtree(old)

    def _wait_sync(self, want: set[tuple], label: str) -> float | None:
        """Until every sidecar reports exactly `want` in force (and no file errors)."""
        agents = set(self.w.agents())
        t0 = time.monotonic()
        tick: dict = {}
        missing = agents
        errors: list[str] = []
        try:
            while True:
                answers = self.w.policies_in_force()
                missing = set()
                errors = []
                for a in agents:
                    res = answers.get(a)
                    got = {(p["kind"], p["namespace"], p["name"]) for p in res["policies"]} \
                        if res else None
                    if res and res.get("errors"):
                        errors += [f"{a}: {e}" for e in res["errors"]]
                    if got != want:
                        missing.add(a)
                if not missing and not errors:
                    self.refs = want
                    return time.monotonic() - t0
                if errors or time.monotonic() - t0 > SYNC_TIMEOUT:
                    break
                self._ticker(label, t0, tick)
                time.sleep(0.05)
        finally:
            self._clear_ticker(tick)
        self.refs = want
        if errors:
            self.say("   " + self._paint("warning", "33") + ": the sidecars report policy errors:\n     "
                     + "\n     ".join(errors[:6]))
        else:
            self.say("   " + self._paint("warning", "33") + f": after {SYNC_TIMEOUT:g} s, sidecars "
                     f"{', '.join(sorted(missing))} do not report the expected policies "
                     f"({self.w.logs()})")
        return None

    def _command(self, check: Check) -> list[str]:
        args = []
        for a in check.args:
            while "{ip:" in a:
                start = a.index("{ip:")
                end = a.index("}", start)
                a = a[:start] + self.w.ip(a[start + 4:end]) + a[end + 1:]
            args.append(a)
        return [*CLIENT, *args]

    def _check(self, n: int, check: Check) -> None:
        total = self.demo.checks
        argv = self._command(check)
        self.say(f"\n [{n}/{total}] {check.title}")
        self.say(f"   $ {self.w.shown(check.workload, argv)}")
        self.say(f"   tutorial: {check.expect}")
        t0 = time.monotonic()
        stdout, stderr, code = self._exec(check.workload, [*argv, "--timeout", f"{self.timeout:g}"])
        secs = time.monotonic() - t0
        ok = check.outcome.matches(stdout, stderr)
        self.done += 1
        self.passed += ok
        if not ok:
            self.failed.append(n)
        mark = self._paint("✔", "32") if ok else self._paint("✘", "31")
        self.say(f"   actual:   {_describe(stdout, stderr, code)}  ({secs:.1f} s)  {mark}")
        if not ok and stderr.strip():
            for line in stderr.strip().splitlines()[-3:]:
                self.say(f"             | {line}")

    def _exec(self, workload: str, argv: list[str]) -> tuple[str, str, int]:
        cmd, env = self.w.command(workload, argv)
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        t0 = time.monotonic()
        tick: dict = {}
        try:
            while True:
                try:
                    out, err = p.communicate(timeout=0.1)
                    return out, err, p.returncode
                except subprocess.TimeoutExpired:
                    if time.monotonic() - t0 > self.timeout + 10:
                        p.kill()
                        out, err = p.communicate()
                        return out, err + "\nthe client did not finish: killed", -9
                    self._ticker(f"waiting (TIMEOUT after {self.timeout:g} s)", t0, tick)
        except BaseException:
            p.kill()
            p.wait()
            raise
        finally:
            self._clear_ticker(tick)


def _describe(stdout: str, stderr: str, code: int) -> str:
    """The client's result in one line: the body (JSON compacted, long text cut), or the word
    for no response with the phase the client names on stderr."""
    text = stdout.strip()
    if text in ("TIMEOUT", "REFUSED", "UNREACHABLE", "RESET", "EMPTY", "UNRESOLVED"):
        detail = [ln[len("client: "):] for ln in stderr.splitlines()
                  if ln.startswith("client: ") and not ln.startswith("client: note:")]
        return f"{text} ({detail[-1]})" if detail else text
    if not text:
        return f"(no output, exit {code})" + (f": {stderr.strip().splitlines()[-1]}" if stderr.strip() else "")
    try:
        text = json.dumps(json.loads(text), separators=(", ", ": "))
    except ValueError:
        pass
    text = " ".join(text.split())
    return text if len(text) <= 72 else text[:71] + "…"
