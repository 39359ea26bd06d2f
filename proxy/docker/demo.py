"""`l7gate demo NAME --compose`: the demo replayed on its docker-compose stack instead of the lab.

The stack is compose/<demo>/docker-compose.yml (only starwars has one). The run builds the images
when their inputs changed (`proxy.docker.images`, on the base they were last built from), brings
the stack up as compose project $COMPOSE_PROJECT_NAME (default `l7gate-<demo>`) with
`L7GATE_POLICIES` pointing at a policies directory of its own (a temporary one, filled stage by
stage exactly as in the lab), replays the tutorial's checks with `docker exec` into the app
containers, and takes the stack down with `down -v --remove-orphans` (containers, network,
registry volume) and removes that directory, also on failure and Ctrl-C; `--keep` leaves both.
The sidecars are asked what is in force with
`docker exec <sidecar> l7gate policy get -o json` (the registry is a volume shared by all of
them), so this works for any user who may run docker, root or not.

`Replay` (proxy.lab.demo.runner) does the rest, with the same ✔/✘ output as the lab demo.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from proxy.docker import images
from proxy.docker.inject import MARKER, REGISTRY_VOLUME, compose_cli
from proxy.lab.demo.runner import CLIENT_TIMEOUT, Replay, other_policy, shown_path
from proxy.lab.demo.scenarios import DEMOS, Demo
from proxy.lab.netns import project_root

PROJECT_LABEL = "com.docker.compose.project"
SERVICE_LABEL = "com.docker.compose.service"
COMMAND_TIMEOUT = 300  # seconds for one docker-compose command (up waits for the healthchecks)
DOWN_ATTEMPTS = 5


@dataclass(frozen=True)
class Workload:
    """One enforced compose service: its app container and the sidecar owning its namespace."""
    name: str  # the compose service (= endpoint name)
    app: str  # container name
    sidecar: str  # container name
    ip: str  # the sidecar's address on the stack's network (the app shares it)
    labels: list[str]  # the endpoint's labels, as its sidecar's `--labels` gives them


def project_containers(project: str) -> list[dict]:
    """`docker inspect` of every container of the compose project (running or not)."""
    ids = subprocess.run(["docker", "ps", "-a", "-q", "--filter", f"label={PROJECT_LABEL}={project}"],
                         capture_output=True, text=True, check=True).stdout.split()
    if not ids:
        return []
    return json.loads(subprocess.run(["docker", "inspect", *ids], capture_output=True, text=True,
                                     check=True).stdout)


def workloads_of(containers: list[dict]) -> dict[str, Workload]:
    """Pair each app container with its sidecar (the one labelled io.l7gate.sidecar-for: APP)."""
    sidecars, apps = {}, {}
    for c in containers:
        labels = c["Config"]["Labels"] or {}
        if MARKER in labels:
            sidecars[labels[MARKER]] = c
        elif SERVICE_LABEL in labels:
            apps[labels[SERVICE_LABEL]] = c
    out = {}
    for name, app in sorted(apps.items()):
        side = sidecars.get(name)
        if side is None:
            continue
        nets = side["NetworkSettings"]["Networks"] or {}
        ip = next((n["IPAddress"] for n in nets.values() if n.get("IPAddress")), "")
        cmd = side["Config"]["Cmd"] or []
        labels = cmd[cmd.index("--labels") + 1].split(",") if "--labels" in cmd else []
        out[name] = Workload(name, app["Name"].lstrip("/"), side["Name"].lstrip("/"), ip, labels)
    return out


class ComposeWorkloads:
    """The demo's compose stack as the workloads of a `Replay`."""

    noun = "stack"

    def __init__(self, file: Path, project: str, compose: list[str], out) -> None:
        self.file = file
        self.project = project
        self.compose = compose
        self.out = out
        self.policies: Path | None = None
        self.started = False  # from here on, remove() takes the project down
        self.workloads: dict[str, Workload] = {}

    @property
    def shown_compose(self) -> str:
        return shlex.join([*self.compose, "-p", self.project, "-f", shown_path(self.file)])

    def _compose(self, *args: str) -> subprocess.CompletedProcess:
        env = dict(os.environ, L7GATE_POLICIES=str(self.policies))
        return subprocess.run([*self.compose, "-p", self.project, "-f", str(self.file), *args],
                              capture_output=True, text=True, env=env, timeout=COMMAND_TIMEOUT)

    # -- build / remove ------------------------------------------------------------------------
    def build(self, say) -> int:
        try:
            images.check_docker()
        except images.BuildError as e:
            say(f"error: {e}")
            return 2
        if project_containers(self.project):
            say(f"error: compose project {self.project} already has containers, maybe from an "
                f"earlier `--keep`; remove it with `{self.shown_compose} down -v` (or set "
                "COMPOSE_PROJECT_NAME to another name) and run the demo again")
            return 1
        say("images (l7gate compose build):")
        try:
            images.build(images.last_base(), self.out)
        except images.BuildError as e:
            say(f"error: {e}")
            return 1
        self.policies = Path(tempfile.mkdtemp(prefix=f"{self.project}-policies-"))
        self.policies.chmod(0o755)  # the sidecars read it as their unprivileged user
        say(f"starting stack {self.project} from {shown_path(self.file)} (workloads with their "
            "sidecars; each app starts once its sidecar is healthy) ...")
        t0 = time.monotonic()
        self.started = True
        p = self._compose("up", "-d")
        if p.returncode != 0:
            say(f"error: {self.compose[0]} up failed:\n  " + "\n  ".join(
                (p.stdout + p.stderr).strip().splitlines()[-12:]))
            return 1
        self.workloads = workloads_of(project_containers(self.project))
        say(f"stack {self.project} is up ({time.monotonic() - t0:.1f} s):")
        self._print()
        return 0

    def _print(self) -> None:
        rows = [("NAME", "IP", "CONTAINER", "SIDECAR", "ENDPOINT LABELS")]
        for w in self.workloads.values():
            shown = [lb for lb in w.labels if not lb.startswith("container:com.docker.compose.")]
            rows.append((w.name, w.ip, w.app, w.sidecar, " ".join(shown)))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        for r in rows:
            print("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[4], file=self.out)
        print(f"  policies: {self.policies}  (drop policy files here)", file=self.out)
        print(f"  registry: docker volume {self.project}_{REGISTRY_VOLUME}   logs: {self.shown_compose} logs",
              file=self.out, flush=True)

    def remove(self, say) -> None:
        if self.started:
            say(f"removing stack {self.project} ...")
            for _ in range(DOWN_ATTEMPTS):
                # After an interrupted `up` the engine may still be creating a container the
                # killed client asked for: the network is then busy; the next `down` gets it.
                try:
                    p = self._compose("down", "-v", "--remove-orphans")
                    problem = (p.stdout + p.stderr).strip().splitlines()[-1:] if p.returncode else []
                    if not problem and project_containers(self.project):
                        problem = ["containers are left"]
                except (OSError, subprocess.SubprocessError) as e:
                    problem = [str(e)]
                if not problem:
                    break
                time.sleep(1)
            if problem:
                say(f"  could not remove everything: {problem[0]}\n"
                    f"  (`{self.shown_compose} down -v` retries)")
            else:
                say(f"stack {self.project} removed")
        if self.policies is not None:
            shutil.rmtree(self.policies, ignore_errors=True)

    # -- what the replay needs ---------------------------------------------------------------------
    def policies_dir(self) -> Path:
        return self.policies

    def agents(self) -> list[str]:
        return list(self.workloads)

    def policies_in_force(self) -> dict[str, dict]:
        """`l7gate policy get` in one sidecar: it asks every agent of the shared registry."""
        side = next(iter(self.workloads.values())).sidecar
        p = subprocess.run(["docker", "exec", side, "l7gate", "policy", "get", "-o", "json"],
                           capture_output=True, text=True, timeout=30)
        return json.loads(p.stdout) if p.returncode == 0 else {}

    def ip(self, workload: str) -> str:
        return self.workloads[workload].ip

    def command(self, workload: str, argv: list[str]) -> tuple[list[str], dict | None]:
        return ["docker", "exec", self.workloads[workload].app, *argv], None

    def shown(self, workload: str, argv: list[str]) -> str:
        return shlex.join(self.command(workload, argv)[0])

    def logs(self) -> str:
        return f"logs: {self.shown_compose} logs"

    def keep_hint(self, demo: Demo) -> str:
        return (f"(`l7gate demo {demo.name} --compose --keep` leaves the stack up to look into: "
                f"`{self.shown_compose} ps`, the sidecars' logs)")

    def keep(self, demo: Demo, say) -> bool:
        side = next(iter(self.workloads.values())).sidecar
        pdir = self.policies
        say(f"\n--keep: stack {self.project} stays up. Explore it:")
        say(f"  {self.shown_compose} ps")
        for ex in demo.explore:
            workload, _, argv = ex.partition(" -- ")
            say(f"  docker exec {self.workloads[workload].app} {argv}")
        say(f"  docker exec -it {next(iter(self.workloads.values())).app} sh    (a shell inside a workload)")
        say(f"  docker exec {side} l7gate endpoint list    (any sidecar; also: policy get, identity "
            "list, fqdn cache list)")
        say(f"  docker exec {side} l7gate observe --last 50    (the flows behind each step; --follow, "
            "--verdict DROPPED, -o json)")
        shown = other_policy(demo)
        if shown:
            say(f"  rm -f {pdir}/* && cp {shown} {pdir}/    (another policy: the sidecars apply it "
                "within a second)")
        say(f"  {self.shown_compose} down -v && rm -r {pdir}    (removes it)")
        return True


def run(name: str, keep: bool = False, out=None) -> int:
    """`l7gate demo NAME --compose [--keep]`: exit codes as `l7gate demo NAME`."""
    out = out or sys.stdout
    demo = DEMOS.get(name)
    if demo is None:
        print(f"error: no demo named {name!r}; the demos are: {', '.join(DEMOS)}", file=out)
        return 2
    file = Path(project_root()) / "compose" / demo.name / "docker-compose.yml"
    if not file.is_file():
        with_stack = [d for d in DEMOS if (Path(project_root()) / "compose" / d / "docker-compose.yml").is_file()]
        print(f"error: demo {name} has no compose stack ({shown_path(file)}); --compose runs "
              f"{', '.join(with_stack) or 'none'}; `l7gate demo {name}` runs it in the namespace lab",
              file=out)
        return 2
    compose = compose_cli()
    if compose is None:
        print("error: neither docker-compose nor `docker compose` is installed", file=out)
        return 2
    project = os.environ.get("COMPOSE_PROJECT_NAME") or f"l7gate-{demo.name}"
    workloads = ComposeWorkloads(file, project, compose, out)
    return Replay(demo, workloads, keep, out, CLIENT_TIMEOUT).main()
