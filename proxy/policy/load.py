"""Loading policies: files -> documents -> schema layer -> agent layer -> api.Policy.

What it does
  `load_paths(paths)` reads every document of the given files and directories (`source`), runs
  the schema layer (`schema`: the API server's CRD/OpenAPI checks, strict about unknown fields)
  and, for an object that passes it, the agent layer (`sanitize.sanitize_policy`, Cilium's
  `Rule.Sanitize()`). It reports one `DocumentReport` per Kubernetes object: valid iff no layer
  found an error. As in Cilium (spec §1.1) one failing rule rejects the whole object: an invalid
  object contributes no policy at all.
  Objects that are not network policies (Deployment, Service, ...) are skipped with a notice and
  count as valid. A file with no document at all (empty, only comments) is reported with
  `empty=True` and no error: loading it means "no policy" (`validate` calls it an error).
  A `kind: List` (`kubectl get -o yaml`) is expanded: each item is reported as
  its own object, with paths such as `items[0].spec`.

What it never does
  It never raises on bad input (every problem is a PolicyError on its document), never stops at
  the first bad document, and never keeps a policy whose object has an error.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from . import api, schema, source
from .errors import LAYER_AGENT, PolicyError

if TYPE_CHECKING:
    from .sanitize import AgentOptions

__all__ = ["DocumentReport", "LoadResult", "load_paths", "load_text"]


@dataclass
class DocumentReport:
    """One Kubernetes object of a file (or one unreadable document / file)."""
    file: str
    kind: str = ""
    namespace: str = ""
    name: str = ""
    errors: list[PolicyError] = field(default_factory=list)
    skipped: str | None = None          # notice for a kind that is not a network policy
    policy: api.Policy | None = None    # set only when valid
    api_version: str = ""
    empty: bool = False                 # the file holds no document (no policy; no error here)
    line: int = 0                       # where the object starts
    column: int = 0

    @property
    def valid(self) -> bool:
        return not self.errors

    def as_dict(self) -> dict:
        """The `policy validate -o json` shape."""
        d = {"file": self.file, "kind": self.kind, "namespace": self.namespace,
             "name": self.name, "valid": self.valid,
             "errors": [e.as_dict() for e in self.errors]}
        if self.skipped:
            d["skipped"] = self.skipped
        return d


@dataclass
class LoadResult:
    documents: list[DocumentReport] = field(default_factory=list)

    @property
    def policies(self) -> list[api.Policy]:
        """The policies of the valid objects, in file order."""
        return [d.policy for d in self.documents if d.valid and d.policy is not None]

    @property
    def errors(self) -> list[PolicyError]:
        return [e for d in self.documents for e in d.errors]

    @property
    def valid(self) -> bool:
        return all(d.valid for d in self.documents)


def load_paths(paths: list[str], options: AgentOptions | None = None,
               regular_only: bool = False) -> LoadResult:
    """Every object of every file named in `paths` or found under a named directory.

    `options` are the agent flags the agent layer assumes (Cilium 1.19's defaults when None).
    regular_only: refuse named files that are not regular files (FIFOs, devices), as files
    found in a directory always are.
    """
    return _load(source.read_paths(list(paths), regular_only), options)


def load_text(text: str, file: str = "<text>", options: AgentOptions | None = None) -> LoadResult:
    """The same for YAML text (tests, stdin)."""
    return _load(source.parse_text(text, file), options)


def _load(documents: list[source.Document], options: AgentOptions | None) -> LoadResult:
    result = LoadResult()
    for doc in documents:
        if not doc.readable:
            result.documents.append(DocumentReport(file=doc.file, errors=list(doc.errors),
                                                   empty=doc.empty,
                                                   line=doc.pos[0], column=doc.pos[1]))
            continue
        objects = list(_objects(doc.value, ()))
        reports = [_check(doc, base, value, options) for base, value in objects]
        if not reports:  # a List without items
            objects = [((), doc.value)]
            reports = [DocumentReport(file=doc.file, kind="List", api_version="v1",
                                      skipped="List (v1) has no items",
                                      line=doc.pos_of(())[0], column=doc.pos_of(())[1])]
        for e in reversed(doc.errors):  # YAML-level findings (duplicate keys) go to their object
            owner = next((r for (base, _), r in zip(objects, reports)
                          if base and _under(e.path, source.format_path(base))), reports[0])
            owner.errors.insert(0, e)
        result.documents += reports
    for report in result.documents:
        if report.errors:
            report.policy = None
        for e in report.errors:
            e.file = report.file
    return result


def _under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith((prefix + ".", prefix + "["))


def _objects(value: Any, base: source.Path):
    """(path, object) for the object itself, or for each item of a `kind: List`."""
    if (isinstance(value, dict) and value.get("kind") == "List"
            and value.get("apiVersion") == "v1" and isinstance(value.get("items"), list)):
        for i, item in enumerate(value["items"]):
            yield from _objects(item, base + ("items", i))
    else:
        yield base, value


def _check(doc: source.Document, base: source.Path, value: Any,
           options: AgentOptions | None) -> DocumentReport:
    line, col = doc.pos_of(base)
    checked = schema.check_object(value, doc.pos_of, base, doc.file)
    report = DocumentReport(file=doc.file, kind=checked.kind, namespace=checked.namespace,
                            name=checked.name, errors=list(checked.errors),
                            skipped=checked.skipped, api_version=checked.api_version,
                            line=line, column=col)
    if checked.policy is None or checked.errors:
        return report
    report.errors += _agent_layer(checked.policy, checked.rule_paths, options)
    report.policy = checked.policy
    return report


def _agent_layer(policy: api.Policy, rule_paths: list[str],
                 options: AgentOptions | None) -> list[PolicyError]:
    from . import sanitize  # the agent layer; imported when first needed
    try:
        return sanitize.sanitize_policy(policy, options, rule_paths=rule_paths)
    except Exception as e:  # an agent-layer bug must reject the object, not crash the command
        line, col = policy.pos
        return [PolicyError(rule_paths[0] if rule_paths else source.DOCUMENT_PATH,
                            f"internal error in the agent layer: {type(e).__name__}: {e}",
                            LAYER_AGENT, line, col, policy.ref.file)]
