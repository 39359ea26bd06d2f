"""The policies directory as the agent sees it: last good version of every file.

A file that fails validation is reported and its previous good version stays in force (spec §1.1:
the previously installed version stays); a file that was never valid contributes nothing. Two
files defining the same policy (kind, namespace, name): the one sorting last wins, like a later
`kubectl apply`.

Files are written in place by editors, `cp` and `>`: truncated first, then filled. A file is
read only once it has stayed untouched for `settle` seconds; until then its previous version
stays (a half-written file would be an empty or a shorter, broader policy: open traffic). A
directory that cannot be listed (gone, unreadable) changes nothing: `problem` says why.
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from proxy.policy import api, source
from proxy.policy.errors import PolicyError
from proxy.policy.load import load_paths

SETTLE = 0.5  # seconds a changed file must stay untouched before it is read


class PolicyDir:
    def __init__(self, path: str | Path, settle: float = SETTLE,
                 clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self.settle = settle
        self.clock = clock
        self._sig: tuple | None = None
        self._good: dict[str, list[api.Policy]] = {}
        self.errors: list[PolicyError] = []
        self.problem: str | None = None  # why the directory could not be read, if it could not
        self.settling: list[str] = []  # files changed too recently to be read yet

    def _signature(self) -> tuple | None:
        """(file, inode, size, mtime, ctime, settled) of every policy file; None when the
        directory could not be listed whole."""
        failed: list[OSError] = []
        files = source.list_files(str(self.path), onerror=failed.append)
        if failed:
            e = failed[0]
            self.problem = f"cannot read {e.filename}: {e.strerror or e}"
            return None
        self.problem = None
        now = self.clock()
        out = []
        for f in files:
            try:
                st = os.stat(f)
            except OSError:
                continue  # gone meanwhile
            settled = abs(now - st.st_mtime) >= self.settle  # (a future mtime: clock skew)
            out.append((f, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, settled))
        return tuple(out)

    def poll(self) -> bool:
        """Reload what changed; True when the policies in force may have changed."""
        sig = self._signature()
        if sig is None or sig == self._sig:
            return False
        self._sig = sig
        ready = [f for f, *_, settled in sig if settled]
        self.settling = [f for f, *_, settled in sig if not settled]
        result = load_paths(ready, regular_only=True) if ready else None
        by_file: dict[str, list] = {}
        for doc in result.documents if result else []:
            by_file.setdefault(doc.file, []).append(doc)
        self.errors = [e for docs in by_file.values() for d in docs for e in d.errors]
        present = {f for f, *_ in sig}
        for f in list(self._good):
            if f not in present:
                del self._good[f]  # deleted file: its policies leave with it
        for f, docs in by_file.items():
            if all(not d.errors for d in docs):
                self._good[f] = [d.policy for d in docs if d.policy is not None]
        return True

    def policies(self) -> list[api.Policy]:
        by_ref: dict[tuple, api.Policy] = {}
        for f in sorted(self._good):
            for p in self._good[f]:
                by_ref[(p.ref.kind, p.ref.namespace, p.ref.name)] = p
        return list(by_ref.values())
