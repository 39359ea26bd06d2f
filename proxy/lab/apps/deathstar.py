"""The Star Wars demo's deathstar (Cilium's `docker.io/cilium/starwars` image), on :80.

POST /v1/request-landing -> `Ship landed`; PUT /v1/exhaust-port -> `Panic: deathstar exploded`
(status 200, as the image answers); GET /v1/ -> a JSON description; GET /v1/healthz -> ok.
Anything else: 404. `--port` may be repeated; `--name` is reported as the hostname (default: the
lab workload name from $L7LAB_WORKLOAD).
"""
from __future__ import annotations

import json

from proxy.lab.apps._serve import http_app_main

TEXT = "text/plain; charset=utf-8"


def describe(hostname: str) -> bytes:
    return (json.dumps({
        "name": "Death Star",
        "hostname": hostname,
        "model": "DS-1 Orbital Battle Station",
        "manufacturer": "Imperial Department of Military Research, Sienar Fleet Systems",
        "cost_in_credits": "1000000000000",
        "length": "120000",
        "crew": "342953",
        "passengers": "843342",
        "cargo_capacity": "1000000000000",
        "hyperdrive_rating": "4.0",
        "starship_class": "Deep Space Mobile Battlestation",
        "api": ["GET   /v1", "GET   /v1/healthz", "POST  /v1/request-landing",
                "PUT   /v1/cargobay", "GET   /v1/hyper-matter-reactor/status",
                "PUT   /v1/exhaust-port"],
    }, indent=4) + "\n").encode()


def handler_for(hostname: str):
    info = describe(hostname)

    def handle(method: str, target: str, headers: dict, body: bytes) -> tuple[int, bytes, str]:
        path = target.split("?", 1)[0].rstrip("/") or "/"
        if method == "POST" and path == "/v1/request-landing":
            return 200, b"Ship landed\n", TEXT
        if method == "PUT" and path == "/v1/exhaust-port":
            return 200, b"Panic: deathstar exploded\n", TEXT
        if method in ("GET", "HEAD") and path == "/v1":
            return 200, info, "application/json"
        if method in ("GET", "HEAD") and path == "/v1/healthz":
            return 200, b"ok\n", TEXT
        if method == "PUT" and path == "/v1/cargobay":
            return 200, b"Cargo bay loaded\n", TEXT
        if method in ("GET", "HEAD") and path == "/v1/hyper-matter-reactor/status":
            return 200, b"Reactor nominal\n", TEXT
        return 404, b"404 page not found\n", TEXT
    return handle


def main(argv: list[str] | None = None) -> int:
    return http_app_main("deathstar", __doc__, handler_for, argv)

if __name__ == "__main__":
    raise SystemExit(main())
