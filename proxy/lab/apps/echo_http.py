"""An HTTP server that names itself: any method, any path -> `<name> <METHOD> <path> host=<Host>`.

Used for the lab's simulated external hosts (api.github.com, cilium.io, ...) and for metrics
endpoints. `--port` may be repeated (default 80); `--name` defaults to $L7LAB_WORKLOAD.
"""
from __future__ import annotations

from proxy.lab.apps._serve import http_app_main


def handler_for(name: str):
    def handle(method: str, target: str, headers: dict, body: bytes) -> tuple[int, bytes, str]:
        host = headers.get("host", "")
        return 200, f"{name} {method} {target} host={host}\n".encode(), "text/plain; charset=utf-8"
    return handle


def main(argv: list[str] | None = None) -> int:
    return http_app_main("echo-http", __doc__, handler_for, argv)

if __name__ == "__main__":
    raise SystemExit(main())
