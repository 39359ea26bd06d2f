"""An HTTP server that names itself: any method, any path -> `<name> <METHOD> <path> host=<Host>`.

Used for the lab's simulated external hosts (api.github.com, cilium.io, ...) and for metrics
endpoints. `--port` may be repeated (default 80); `--name` defaults to $L7LAB_WORKLOAD.
"""
from __future__ import annotations

import argparse
import os
import socket

from proxy.lab.apps._serve import run, serve_http


def handler_for(name: str):
    def handle(method: str, target: str, headers: dict, body: bytes) -> tuple[int, bytes, str]:
        host = headers.get("host", "")
        return 200, f"{name} {method} {target} host={host}\n".encode(), "text/plain; charset=utf-8"
    return handle


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="echo-http", description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, action="append", help="listen port (repeatable; default 80)")
    ap.add_argument("--name", default=os.environ.get("L7LAB_WORKLOAD") or socket.gethostname())
    args = ap.parse_args(argv)
    handler = handler_for(args.name)
    return run(lambda stop: serve_http(handler, args.port or [80], stop))


if __name__ == "__main__":
    raise SystemExit(main())
