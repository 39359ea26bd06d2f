"""The agent's control socket and the `cilium-dbg`-style commands that read it.

Protocol: one JSON request line (`{"cmd": "endpoint list"}`) and one JSON answer line over a unix
stream socket at `<registry>/agents/<name>.sock`. The CLI asks every agent in the registry and
merges the answers, like `cilium-dbg` on a node that runs many endpoints.
"""
from __future__ import annotations

import asyncio
import json
import os
import socket
from pathlib import Path
from typing import Awaitable, Callable

Handler = Callable[[str], object]
# `{"cmd": "observe", ...}`: streams flows (proxy.observe.relay.handle_observe) on the connection
ObserveHandler = Callable[[dict, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
COMMANDS = ("status", "endpoint list", "identity list", "fqdn cache list", "policy get")
DEFAULT_REGISTRY = "/run/l7gate/registry"


async def serve(path: Path, handler: Handler,
                observe: ObserveHandler | None = None) -> asyncio.AbstractServer:
    path.unlink(missing_ok=True)

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 5)
            try:
                request = json.loads(line)
                cmd = request["cmd"]
                if cmd == "observe" and observe is not None:
                    await observe(request, reader, writer)
                    return
                answer = {"ok": True, "result": handler(cmd)} if cmd in COMMANDS else \
                    {"ok": False, "error": f"unknown command {cmd!r}"}
            except (ValueError, KeyError, TypeError):
                answer = {"ok": False, "error": "bad request"}
            writer.write(json.dumps(answer).encode() + b"\n")
            await writer.drain()
        except (asyncio.TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_unix_server(on_client, path=str(path))
    os.chmod(path, 0o600)
    return server


def ask(path: Path, cmd: str, timeout: float = 3.0) -> object:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        s.sendall(json.dumps({"cmd": cmd}).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    answer = json.loads(buf)
    if not answer.get("ok"):
        raise RuntimeError(answer.get("error", "agent error"))
    return answer["result"]


def ask_all(registry: str, cmd: str) -> list[tuple[str, object]]:
    """(agent name, result) for every agent answering in the registry; dead sockets skipped."""
    out = []
    for sock in sorted(Path(registry, "agents").glob("*.sock")):
        try:
            out.append((sock.stem, ask(sock, cmd)))
        except (OSError, ValueError, RuntimeError):
            continue
    return out


# ---- the CLI commands ------------------------------------------------------------------------

def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    fmt = "   ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join(fmt.format(*map(str, r)).rstrip() for r in [header] + rows) + "\n"


def run(cmd: str, registry: str, output: str, out) -> int:
    answers = ask_all(registry, cmd)
    if not answers:
        print(f"l7gate: no agent answers in {registry} (is `l7gate run` or a lab up?)", file=out)
        return 1
    if cmd == "policy get":
        merged = {name: res for name, res in answers}
    else:
        merged = [dict(row, agent=name) for name, res in answers for row in res]
        if cmd == "identity list":  # every agent knows every identity: keep each once
            merged = list({r["id"]: r for r in merged}.values())
    if output == "json":
        json.dump(merged, out, indent=2)
        out.write("\n")
        return 0
    out.write(_render(cmd, merged))
    return 0


def _render(cmd: str, data) -> str:
    if cmd == "endpoint list":
        rows = []
        for e in data:
            labels = e["labels"] or [""]
            rows.append([e["name"], e["ingress"], e["egress"], e["identity"], labels[0],
                         ",".join(e["ips"]), e["status"]])
            rows += [["", "", "", "", lb, "", ""] for lb in labels[1:]]
        return _table(rows, ["ENDPOINT", "POLICY (ingress) ENFORCEMENT", "POLICY (egress) ENFORCEMENT",
                             "IDENTITY", "LABELS (source:key[=value])", "IPv4", "STATUS"])
    if cmd == "identity list":
        rows = []
        for i in sorted(data, key=lambda r: r["id"]):
            labels = i["labels"] or [""]
            rows.append([i["id"], labels[0]])
            rows += [["", lb] for lb in labels[1:]]
        return _table(rows, ["ID", "LABELS"])
    if cmd == "fqdn cache list":
        rows = [[r["agent"], "lookup", r["name"], r["ttl"], r["expires"], r["ip"]] for r in data]
        return _table(rows, ["Endpoint", "Source", "FQDN", "TTL", "ExpirationTime", "IPs"])
    return json.dumps(data, indent=2) + "\n"
