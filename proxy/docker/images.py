"""`l7gate compose build`: the sidecar image (`l7gate-sidecar:latest`) from local inputs only.

Three steps, each skipped when its inputs did not change, so a second build takes seconds:

1. The base. Default (offline, what CI uses): `debootstrap --variant=minbase bookworm` with
   python3 and the Dockerfile's `DEBS` into a temporary directory, trimmed (apt lists and
   caches, docs, man pages, locales), then `tar | docker import` as `l7gate-base:<tag>`. The tag
   is a hash of (suite, mirror, packages), so an existing image is reused (`docker image
   inspect`) and the rootfs is never kept anywhere but in that image. Needs root (debootstrap)
   and the Debian mirror ($L7GATE_DEBIAN_MIRROR, default deb.debian.org). With `--base IMAGE`
   (e.g. python:3.11-slim, for hosts that reach a registry) that image is the base instead and
   the Dockerfile installs the packages it lacks with apt-get.
2. The wheels, prepared on the host in compose/.build/wheels/ (the build context never reaches
   PyPI): `deps/` holds pip and the dependencies of pyproject.toml, downloaded as binary wheels
   for CPython 3.11 on manylinux (bookworm's python3 and python:3.11-slim are both 3.11);
   `l7gate/` holds the project's own wheel. Each directory keeps a stamp of its inputs
   (pyproject.toml; plus every file of proxy/ for the project wheel) and is rebuilt only when
   that changes: an unchanged wheel keeps docker's layer cache valid.
3. `docker build compose/` with `--build-arg BASE=...`, labelled with a hash of every input
   (base, pyproject, sources, Dockerfile, entrypoint); an image that carries the same label is
   up to date and is not built again.

Never does: push or pull images itself (`docker build` pulls a registry base if it must), or
remove an image other than the sidecar image a build replaced.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from proxy.docker.inject import IMAGE

SUITE = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
BASE_REPO = "l7gate-base"
INPUTS_LABEL = "io.l7gate.inputs"
BASE_LABEL = "io.l7gate.base-image"  # the --base the sidecar image was last built from
PYTHON = "3.11"  # the base's python3 (bookworm) and python:3.11-slim: the wheels are built for it
GLIBC = 36  # bookworm's glibc is 2.36: manylinux wheels for 2.36 and older fit
# What debootstrap leaves that a container never needs (relative to the rootfs).
TRIM = ("var/cache/apt", "var/lib/apt/lists", "usr/share/doc", "usr/share/man", "usr/share/info",
        "usr/share/locale")
IMAGE_INPUTS = ("Dockerfile", "entrypoint", ".dockerignore")  # under compose/


class BuildError(RuntimeError):
    """A build step failed; the message says which and why."""


@dataclass(frozen=True)
class BaseSpec:
    """What the offline base is made of; its hash is the image tag."""
    packages: tuple[str, ...]
    suite: str = SUITE
    mirror: str = DEFAULT_MIRROR

    @property
    def image(self) -> str:
        key = json.dumps([self.suite, self.mirror, sorted(self.packages)]).encode()
        return f"{BASE_REPO}:{hashlib.sha256(key).hexdigest()[:12]}"


@dataclass(frozen=True)
class Project:
    """The files a build reads, from a clone of the repository."""
    root: Path

    @property
    def context(self) -> Path:
        return self.root / "compose"

    @property
    def wheels(self) -> Path:
        return self.context / ".build" / "wheels"

    def dockerfile_debs(self) -> tuple[str, ...]:
        """The Dockerfile's `ARG DEBS="..."`: the Debian packages the image needs."""
        m = re.search(r'^ARG DEBS="([^"]*)"', (self.context / "Dockerfile").read_text(), re.M)
        if not m:
            raise BuildError(f"{self.context / 'Dockerfile'}: no ARG DEBS=\"...\" line")
        return tuple(m.group(1).split())

    def dependencies(self) -> list[str]:
        with open(self.root / "pyproject.toml", "rb") as f:
            return list(tomllib.load(f)["project"]["dependencies"])

    def digest(self, *parts: str | Path) -> str:
        """sha256 over files (each with its path relative to the root: a rename counts) and strings."""
        h = hashlib.sha256()
        for part in parts:
            if isinstance(part, Path):
                files = sorted(p for p in part.rglob("*") if p.is_file() and "__pycache__" not in p.parts) \
                    if part.is_dir() else [part]
                for p in files:
                    h.update(str(p.relative_to(self.root)).encode() + b"\0" + p.read_bytes() + b"\0")
            else:
                h.update(part.encode() + b"\0")
        return h.hexdigest()


def find_project() -> Project:
    root = Path(__file__).resolve().parents[2]
    if not (root / "compose" / "Dockerfile").is_file() or not (root / "pyproject.toml").is_file():
        raise BuildError(f"{root / 'compose' / 'Dockerfile'} is missing: `l7gate compose build` "
                         "runs from a clone of the repository")
    return Project(root)


def base_spec(project: Project) -> BaseSpec:
    return BaseSpec(("python3",) + project.dockerfile_debs(),
                    mirror=os.environ.get("L7GATE_DEBIAN_MIRROR") or DEFAULT_MIRROR)


# -- docker ------------------------------------------------------------------------------------

def docker(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["docker", *args], capture_output=True, text=True)


def check_docker() -> None:
    if shutil.which("docker") is None:
        raise BuildError("the docker command is not installed")
    p = docker("info", "--format", "{{.ServerVersion}}")
    if p.returncode != 0:
        raise BuildError(f"Docker is not available: {_last(p.stderr)}")


def image_label(ref: str, label: str) -> str | None:
    """The image's label value; None when there is no such image (or label)."""
    p = docker("image", "inspect", "--format", "{{json .Config.Labels}}", ref)
    if p.returncode != 0:
        return None
    return (json.loads(p.stdout) or {}).get(label)


def image_exists(ref: str) -> bool:
    return docker("image", "inspect", "--format", "{{.Id}}", ref).returncode == 0


def _last(text: str, n: int = 1) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return "\n".join(lines[-n:]) if lines else "(no message)"


def _run(argv: list[str], what: str) -> None:
    p = subprocess.run(argv, capture_output=True, text=True)
    if p.returncode != 0:
        raise BuildError(f"{what} failed (exit {p.returncode}):\n{_last(p.stdout + p.stderr, 15)}")


# -- 1. the base -------------------------------------------------------------------------------

def build_base(spec: BaseSpec, out: TextIO) -> bool:
    """Make `spec.image` unless it exists; True when it was built."""
    if image_exists(spec.image):
        print(f"base:   {spec.image} reused (debootstrap {spec.suite}: {' '.join(spec.packages)})",
              file=out, flush=True)
        return False
    if os.geteuid() != 0:
        raise BuildError("building the offline base needs root (debootstrap); run as root, or pass "
                         "--base python:3.11-slim when a registry is reachable")
    if shutil.which("debootstrap") is None:
        raise BuildError("debootstrap is not installed (apt-get install debootstrap)")
    print(f"base:   building {spec.image}: debootstrap --variant=minbase {spec.suite} from "
          f"{spec.mirror} with {' '.join(spec.packages)} (about a minute) ...", file=out, flush=True)
    t0 = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="l7gate-base-"))
    try:
        rootfs = tmp / "rootfs"
        _run(["debootstrap", "--variant=minbase", f"--include={','.join(spec.packages)}",
              spec.suite, str(rootfs), spec.mirror], "debootstrap")
        for rel in TRIM:
            d = rootfs / rel
            if d.is_dir():
                shutil.rmtree(d)
                d.mkdir()
        _import(rootfs, spec)
    finally:
        _unmount_under(tmp)  # debootstrap mounts /proc and /sys in the target; an interrupt leaves them
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"base:   {spec.image} built ({time.monotonic() - t0:.0f} s)", file=out, flush=True)
    return True


def _unmount_under(path: Path) -> None:
    """Lazily unmount every mount below `path`, deepest first."""
    prefix = str(path) + "/"
    with open("/proc/self/mounts") as f:
        points = [line.split()[1] for line in f if line.split()[1].startswith(prefix)]
    for point in sorted(points, key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True)


def _import(rootfs: Path, spec: BaseSpec) -> None:
    """`tar -C rootfs -c . | docker import - IMAGE`, labelled with what it holds."""
    label = f"LABEL io.l7gate.base={spec.suite}:{','.join(spec.packages)}"
    tar = subprocess.Popen(["tar", "--numeric-owner", "-C", str(rootfs), "-c", "."],
                           stdout=subprocess.PIPE)
    try:
        imp = subprocess.run(["docker", "import", "--change", label, "-", spec.image], stdin=tar.stdout,
                             capture_output=True, text=True)
    finally:
        tar.stdout.close()
        tar.wait()
    if tar.returncode != 0 or imp.returncode != 0:
        raise BuildError(f"docker import of the base failed: {_last(imp.stderr)}")


# -- 2. the wheels -----------------------------------------------------------------------------

def _pip(*args: str) -> list[str]:
    return [sys.executable, "-m", "pip", "--disable-pip-version-check", *args]


def _fill(dest: Path, stamp: str, make) -> bool:
    """Replace `dest` by what `make(tmpdir)` writes, unless dest's stamp is `stamp` already.
    True when it was refilled."""
    stamp_file = dest / ".inputs"
    if stamp_file.is_file() and stamp_file.read_text() == stamp:
        return False
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    tmp.chmod(0o755)
    try:
        make(tmp)
        (tmp / ".inputs").write_text(stamp)
        shutil.rmtree(dest, ignore_errors=True)
        tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return True


def prepare_wheels(project: Project, out: TextIO) -> bool:
    """compose/.build/wheels/{deps,l7gate}; True when either was rebuilt."""
    deps = project.dependencies()
    machine = platform.machine()
    abi = "cp" + PYTHON.replace(".", "")

    # pip takes each manylinux tag literally (only the legacy manylinux2014 alias expands)
    platforms = [f"manylinux_2_{v}_{machine}" for v in range(GLIBC, 16, -1)] + [f"manylinux2014_{machine}"]

    def download(tmp: Path) -> None:
        _run(_pip("download", "--quiet", "--only-binary=:all:", "--python-version", PYTHON,
                  "--implementation", "cp", "--abi", abi,
                  *(arg for p in platforms for arg in ("--platform", p)),
                  "--dest", str(tmp), "pip", *deps), "pip download (the dependencies' wheels)")

    def wheel(tmp: Path) -> None:
        # from a copy of exactly what the wheel holds: setuptools would otherwise leave build/ in
        # the clone, and package modules deleted since from its build/lib
        with tempfile.TemporaryDirectory(prefix="l7gate-src-") as src:
            shutil.copy(project.root / "pyproject.toml", src)
            shutil.copytree(project.root / "proxy", Path(src) / "proxy",
                            ignore=shutil.ignore_patterns("__pycache__"))
            _run(_pip("wheel", "--quiet", "--no-deps", "--wheel-dir", str(tmp), src),
                 "pip wheel (the l7gate wheel)")

    pyproject = project.root / "pyproject.toml"
    built = []
    if _fill(project.wheels / "deps", project.digest(pyproject, PYTHON, machine), download):
        built.append("dependencies (" + ", ".join(deps) + ")")
    if _fill(project.wheels / "l7gate", project.digest(pyproject, project.root / "proxy"), wheel):
        built.append("l7gate")
    where = os.path.relpath(project.wheels)
    print(f"wheels: {', '.join(built)} prepared in {where}/" if built else f"wheels: {where}/ up to date",
          file=out, flush=True)
    return bool(built)


# -- 3. the image ------------------------------------------------------------------------------

def inputs_digest(project: Project, base: str) -> str:
    """Everything the image is made of: the base, pyproject, the sources, the Dockerfile & co."""
    ctx = project.context
    return project.digest(base, project.root / "pyproject.toml", project.root / "proxy",
                          *(ctx / f for f in IMAGE_INPUTS))


def build_image(project: Project, base: str, digest: str, out: TextIO) -> None:
    """`docker build`; the image it replaces is removed when nothing uses it (docker refuses
    otherwise), so rebuilds leave no untagged images behind."""
    old = docker("image", "inspect", "--format", "{{.Id}}", IMAGE).stdout.strip()
    print(f"image:  docker build {os.path.relpath(project.context)}/ -t {IMAGE} --build-arg BASE={base} ...",
          file=out, flush=True)
    t0 = time.monotonic()
    _run(["docker", "build", "--force-rm", "--tag", IMAGE, "--build-arg", f"BASE={base}",
          "--label", f"{INPUTS_LABEL}={digest}", "--label", f"{BASE_LABEL}={base}", str(project.context)],
         "docker build")
    print(f"image:  {IMAGE} built ({time.monotonic() - t0:.1f} s)", file=out, flush=True)
    if old and old != docker("image", "inspect", "--format", "{{.Id}}", IMAGE).stdout.strip():
        docker("image", "rm", old)


def build(base: str | None, out: TextIO) -> list[str]:
    """All three steps; a step whose inputs did not change is skipped (and said so). Returns the
    steps that did work ("base", "wheels", "image")."""
    project = find_project()
    check_docker()
    built = []
    if base is None:
        spec = base_spec(project)
        base = spec.image
        if build_base(spec, out):
            built.append("base")
    else:
        print(f"base:   {base} (given)", file=out, flush=True)
    digest = inputs_digest(project, base)
    if image_label(IMAGE, INPUTS_LABEL) == digest:
        print(f"wheels: not needed\nimage:  {IMAGE} up to date (inputs {digest[:12]})", file=out, flush=True)
        return built
    if prepare_wheels(project, out):
        built.append("wheels")
    build_image(project, base, digest, out)
    built.append("image")
    return built


def last_base() -> str | None:
    """The base the existing sidecar image was built from when it was given with --base (so the
    demo rebuilds on it, e.g. python:3.11-slim without root); None for the offline base, whose
    tag follows its spec."""
    base = image_label(IMAGE, BASE_LABEL)
    return None if base is None or base.startswith(BASE_REPO + ":") else base


def build_command(base: str | None, out: TextIO) -> int:
    """`l7gate compose build [--base IMAGE]`: 0 built or up to date, 1 failed."""
    t0 = time.monotonic()
    try:
        built = build(base, out)
    except BuildError as e:
        print(f"error: {e}", file=out)
        return 1
    what = ", ".join(built) if built else "nothing (all up to date)"
    print(f"{IMAGE} ready (built: {what}; {time.monotonic() - t0:.1f} s)", file=out)
    return 0
