"""`l7gate policy validate PATH... [-o text|json]`: report every error of every document.

Exit 0 when every document is valid, 1 otherwise. Output:
* json: a list with one object per Kubernetes object found, in file order:
  `{file, kind, namespace, name, valid, errors: [{line, column, path, message, layer}]}`.
  Objects of other kinds (Deployment, Service, ...) are listed too, with `valid: true` and a
  `skipped` notice, so that every file given appears in the report; unreadable documents appear
  with an empty kind, and so does a file holding no document at all (an error here, although
  loading such a file for `trace` just means "no policy").
* text: one line per error, `FILE:LINE:COL: <field path>: <reason> [<layer>]`, one line per
  skipped object, and a summary line.
File names are printed as given on the command line (files found under a directory argument as
joined with it).
"""
from __future__ import annotations

import json
from typing import TextIO

from .errors import LAYER_YAML, PolicyError
from .load import LoadResult, load_paths
from .sanitize import AgentOptions
from .source import FILE_PATH

__all__ = ["run", "summary"]


def run(paths: list[str], output: str, out: TextIO, options: AgentOptions | None = None) -> int:
    result = load_paths(paths, options)
    for d in result.documents:  # nothing to validate is a mistake here (kubectl: "no objects")
        if d.empty:
            d.errors.append(PolicyError(FILE_PATH, "file holds no YAML document (nothing to "
                                                   "validate)", LAYER_YAML, 1, 1, d.file))
    if output == "json":
        json.dump([d.as_dict() for d in result.documents], out, indent=2, ensure_ascii=False)
        out.write("\n")
    else:
        for d in result.documents:
            for e in d.errors:
                out.write(f"{e}\n")
            if d.skipped:
                out.write(f"{d.file}:{d.line}:{d.column}: skipped: {d.skipped}\n")
        out.write(summary(result) + "\n")
    return 0 if result.valid else 1


def summary(result: LoadResult) -> str:
    docs = result.documents
    skipped = sum(1 for d in docs if d.skipped)
    invalid = [d for d in docs if not d.valid]
    valid = len(docs) - skipped - len(invalid)
    if not docs:
        return "no documents found"
    parts = [f"{valid} valid", f"{len(invalid)} invalid"]
    if skipped:
        parts.append(f"{skipped} skipped")
    files = len({d.file for d in docs})
    errors = sum(len(d.errors) for d in invalid)
    tail = f" ({errors} error{'s' if errors != 1 else ''})" if errors else ""
    return (f"{len(docs)} document{'s' if len(docs) != 1 else ''} in {files} "
            f"file{'s' if files != 1 else ''}: " + ", ".join(parts) + tail)
