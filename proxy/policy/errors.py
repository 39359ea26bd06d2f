"""One error type for every rejected policy, whichever layer rejected it."""
from __future__ import annotations

from dataclasses import dataclass

# Layers, in the order a document meets them (spec §0): YAML syntax, the CRD/OpenAPI schema the
# API server would apply, then the agent's sanitization (`Rule.Sanitize()`).
LAYER_YAML = "yaml"
LAYER_SCHEMA = "schema"
LAYER_AGENT = "agent"


@dataclass
class PolicyError:
    path: str  # field path, e.g. "spec.ingress[0].toPorts[0].ports[0].port"
    message: str
    layer: str
    line: int = 0
    column: int = 0
    file: str = ""

    def as_dict(self) -> dict:
        return {"line": self.line, "column": self.column, "path": self.path,
                "message": self.message, "layer": self.layer}

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}: {self.path}: {self.message} [{self.layer}]"
