"""Shared plumbing for the built-in apps: an event loop that stops on SIGTERM/SIGINT, and a
minimal HTTP/1.1 server (keep-alive, Content-Length and chunked bodies) for deathstar/echo_http."""
from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
from collections.abc import Awaitable, Callable
from email.utils import formatdate
from http import HTTPStatus

MAX_HEAD = 64 * 1024
MAX_BODY = 1 << 20

# handler(method, target, headers(lowercased names), body) -> (status, body, content type)
Handler = Callable[[str, str, dict[str, str], bytes], tuple[int, bytes, str]]


def http_app_main(prog: str, doc: str, handler_for: Callable[[str], Handler],
                  argv: list[str] | None = None) -> int:
    """The command line every built-in HTTP app shares: `--port` (repeatable), `--name`."""
    ap = argparse.ArgumentParser(prog=prog, description=doc.splitlines()[0])
    ap.add_argument("--port", type=int, action="append", help="listen port (repeatable; default 80)")
    ap.add_argument("--name", default=os.environ.get("L7LAB_WORKLOAD") or socket.gethostname())
    args = ap.parse_args(argv)
    handler = handler_for(args.name)
    return run(lambda stop: serve_http(handler, args.port or [80], stop))


def run(main: Callable[[asyncio.Event], Awaitable[None]]) -> int:
    """Run `main(stop)` until it returns; SIGTERM/SIGINT set `stop`."""
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass

    async def wrapper() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await main(stop)

    asyncio.run(wrapper())
    return 0


class BadRequest(Exception):
    pass


async def _read_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
    if "chunked" in headers.get("transfer-encoding", "").lower():
        out = bytearray()
        while True:
            line = await reader.readuntil(b"\r\n")
            try:
                size = int(line.split(b";")[0].strip(), 16)
            except ValueError:
                raise BadRequest("bad chunk size") from None
            if size == 0:
                while (await reader.readuntil(b"\r\n")) != b"\r\n":  # trailers
                    pass
                return bytes(out)
            if len(out) + size > MAX_BODY:
                raise BadRequest("body too large")
            out += await reader.readexactly(size)
            await reader.readexactly(2)
    length = headers.get("content-length")
    if length is None:
        return b""
    if not length.isdigit() or int(length) > MAX_BODY:
        raise BadRequest("bad content-length")
    return await reader.readexactly(int(length))


def _response(status: int, body: bytes, ctype: str, close: bool) -> bytes:
    try:
        reason = HTTPStatus(status).phrase
    except ValueError:
        reason = "Unknown"
    head = [f"HTTP/1.1 {status} {reason}", f"Content-Type: {ctype}",
            f"Content-Length: {len(body)}", f"Date: {formatdate(usegmt=True)}"]
    if close:
        head.append("Connection: close")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def http_handler(handler: Handler):
    async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    return  # peer closed between requests
                except asyncio.LimitOverrunError:
                    writer.write(_response(431, b"Request Header Fields Too Large\n", "text/plain", True))
                    return
                lines = head.decode("latin-1").split("\r\n")
                parts = lines[0].split(" ")
                if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
                    writer.write(_response(400, b"Bad Request\n", "text/plain", True))
                    return
                method, target, version = parts
                headers: dict[str, str] = {}
                for line in lines[1:]:
                    if not line:
                        continue
                    name, sep, value = line.partition(":")
                    if not sep:
                        writer.write(_response(400, b"Bad Request\n", "text/plain", True))
                        return
                    headers[name.strip().lower()] = value.strip()
                try:
                    body = await _read_body(reader, headers)
                except BadRequest:
                    writer.write(_response(400, b"Bad Request\n", "text/plain", True))
                    return
                conn = headers.get("connection", "").lower()
                close = conn == "close" or (version == "HTTP/1.0" and conn != "keep-alive")
                status, out, ctype = handler(method, target, headers, body)
                writer.write(_response(status, b"" if method == "HEAD" else out, ctype, close))
                await writer.drain()
                if close:
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
    return on_conn


async def serve_http(handler: Handler, ports: list[int], stop: asyncio.Event, host: str = "0.0.0.0") -> None:
    servers = [await asyncio.start_server(http_handler(handler), host, p, reuse_address=True,
                                          limit=MAX_HEAD) for p in ports]
    await stop.wait()
    for s in servers:
        s.close()
