"""How tests find and run the real `l7gate` command line."""
import json
import os
import queue
import shlex
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def l7gate() -> list[str]:
    """The CLI under test: $L7GATE, else the project's venv, else the one next to this Python."""
    if os.environ.get("L7GATE"):
        return shlex.split(os.environ["L7GATE"])
    for cand in (ROOT / ".venv" / "bin" / "l7gate", Path(sys.executable).parent / "l7gate"):
        if os.access(cand, os.X_OK):
            return [str(cand)]
    return [shutil.which("l7gate") or str(ROOT / ".venv" / "bin" / "l7gate")]


def run_cli(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(l7gate() + list(args), capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT)



class Output:
    """A command's stdout read by a thread, so tests can wait for a line (to interrupt the command
    at a given point) and then collect the rest."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self._q: queue.Queue = queue.Queue()
        self.lines: list[str] = []

        def pump() -> None:
            for line in proc.stdout:
                self._q.put(line)
            self._q.put(None)
        threading.Thread(target=pump, daemon=True).start()

    def until(self, text: str, seconds: float) -> bool:
        """Read until a line contains `text`; False if the output ended or time ran out first."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                line = self._q.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                return False
            if line is None:
                return False
            self.lines.append(line)
            if text in line:
                return True
        return False

    def rest(self, timeout: float = 5) -> str:
        """Everything read so far and up to the end of the output."""
        while (line := self._q.get(timeout=timeout)) is not None:
            self.lines.append(line)
        return "".join(self.lines)

    def __str__(self) -> str:
        return "".join(self.lines)


def run_in_scratch_netns(script: str, timeout: float = 60) -> object:
    """A Python script (sys.argv[1]: the repository) run in a network namespace of its own
    (`unshare --net`, gone with it); what it printed, read as JSON."""
    p = subprocess.run(["unshare", "--net", "--", sys.executable, "-c", script, str(ROOT)],
                       capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)
