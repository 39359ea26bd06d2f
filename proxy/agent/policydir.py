"""The policies directory as the agent sees it: last good version of every file.

A file that fails validation is reported and its previous good version stays in force (spec §1.1:
the previously installed version stays); a file that was never valid contributes nothing. Two
files defining the same policy (kind, namespace, name): the one sorting last wins, like a later
`kubectl apply`.
"""
from __future__ import annotations

import os
from pathlib import Path

from proxy.policy import api
from proxy.policy.errors import PolicyError
from proxy.policy.load import load_paths

SUFFIXES = (".yaml", ".yml", ".json")


class PolicyDir:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._sig: tuple | None = None
        self._good: dict[str, list[api.Policy]] = {}
        self.errors: list[PolicyError] = []

    def _signature(self) -> tuple:
        out = []
        for root, _, files in os.walk(self.path):
            for f in files:
                if f.endswith(SUFFIXES) and not f.startswith("."):
                    p = os.path.join(root, f)
                    try:
                        st = os.stat(p)
                    except OSError:
                        continue
                    out.append((p, st.st_mtime_ns, st.st_size))
        return tuple(sorted(out))

    def poll(self) -> bool:
        """Reload when anything changed; True when the policies in force may have changed."""
        sig = self._signature()
        if sig == self._sig:
            return False
        self._sig = sig
        result = load_paths([str(self.path)]) if sig else None
        by_file: dict[str, list] = {}
        for doc in result.documents if result else []:
            by_file.setdefault(doc.file, []).append(doc)
        self.errors = [e for docs in by_file.values() for d in docs for e in d.errors]
        present = {p for p, _, _ in sig}
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
