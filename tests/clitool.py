"""How tests find and run the real `l7gate` command line."""
import os
import shlex
import shutil
import subprocess
import sys
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
