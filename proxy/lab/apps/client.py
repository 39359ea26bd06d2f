"""A small HTTP (or raw TCP) client for the lab's demos and tests, when curl is not installed.

    python -m proxy.lab.apps.client --method POST --url http://deathstar/v1/request-landing --timeout 3
    python -m proxy.lab.apps.client --tcp user-db:27017 --send ping --timeout 3

Prints the response body (with `-i`, the status line and headers first) and exits 0 on any HTTP
response (`--fail`: 22 on a status >= 400, like curl -f). When there is no response it prints one
word on stdout, so a hang can be told from a refusal, and exits with curl's code for it:

    TIMEOUT      28  nothing within --timeout (a dropped SYN hangs until this; stderr says which
                     phase: resolve, connect or response)
    REFUSED       7  connection refused (RST in answer to the SYN)
    UNREACHABLE   7  no route / host unreachable (ICMP or ARP failure)
    RESET        56  connection reset after it was established
    EMPTY        52  the server closed the connection without answering
    UNRESOLVED    6  the name does not resolve (NXDOMAIN, REFUSED, ...)

Names resolve through the system resolver (the lab's DNS server, via the workload's resolv.conf).
"""
from __future__ import annotations

import argparse
import errno
import http.client
import socket
import sys
import threading
import time
from urllib.parse import urlsplit

CODES = {"TIMEOUT": 28, "REFUSED": 7, "UNREACHABLE": 7, "RESET": 56, "EMPTY": 52, "UNRESOLVED": 6}


class Outcome(Exception):
    def __init__(self, word: str, detail: str) -> None:
        super().__init__(detail)
        self.word = word
        self.detail = detail


class Deadline:
    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self, phase: str) -> float:
        left = self.end - time.monotonic()
        if left <= 0:
            raise Outcome("TIMEOUT", f"timed out ({phase})")
        return left


def resolve(host: str, port: int, deadline: Deadline) -> list[tuple]:
    """getaddrinfo in a thread, so a resolver that hangs cannot outlive the deadline."""
    box: dict = {}

    def work() -> None:
        try:
            box["addrs"] = socket.getaddrinfo(host, port, socket.AF_UNSPEC, socket.SOCK_STREAM)
        except socket.gaierror as e:
            box["error"] = e

    t = threading.Thread(target=work, daemon=True)
    t.start()
    t.join(deadline.left("resolve"))
    if t.is_alive():
        raise Outcome("TIMEOUT", f"timed out resolving {host}")
    if "error" in box:
        raise Outcome("UNRESOLVED", f"cannot resolve {host}: {box['error'].strerror}")
    return box["addrs"]


def connect(host: str, port: int, deadline: Deadline) -> socket.socket:
    """Try each address in turn (like curl) until one connects; the deadline covers them all."""
    last: Outcome | None = None
    for family, type_, proto, _, addr in resolve(host, port, deadline):
        s = socket.socket(family, type_, proto)
        s.settimeout(deadline.left("connect"))
        try:
            s.connect(addr)
            return s
        except TimeoutError:
            s.close()
            raise Outcome("TIMEOUT", f"timed out connecting to {addr[0]}:{port}") from None
        except ConnectionRefusedError:
            last = Outcome("REFUSED", f"connection to {addr[0]}:{port} refused")
        except OSError as e:
            if e.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN):
                last = Outcome("UNREACHABLE", f"{addr[0]}:{port}: {e.strerror}")
            elif e.errno == errno.ECONNRESET:
                last = Outcome("RESET", f"{addr[0]}:{port}: connection reset")
            else:
                raise
        s.close()
    raise last or Outcome("UNRESOLVED", f"no address for {host}")


def _io_errors(phase: str):
    """Map socket errors met after the connection is up to the outcome words."""
    class _Ctx:
        def __enter__(self):
            return self

        def __exit__(self, et, e, tb):
            if et is None:
                return False
            if issubclass(et, http.client.RemoteDisconnected):
                raise Outcome("EMPTY", "server closed the connection without a response") from None
            if issubclass(et, (socket.timeout, TimeoutError)):
                raise Outcome("TIMEOUT", f"timed out ({phase})") from None
            if issubclass(et, (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)):
                raise Outcome("RESET", f"connection reset ({phase})") from None
            return False
    return _Ctx()


def http_request(args, deadline: Deadline, out) -> int:
    url = urlsplit(args.url)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise SystemExit(f"client: unsupported URL {args.url!r} (http://HOST[:PORT]/PATH)")
    if url.scheme == "https":
        print("client: note: https is sent as plain HTTP (the lab's external hosts speak plain HTTP on 443)",
              file=sys.stderr)
    port = url.port or (443 if url.scheme == "https" else 80)
    sock = connect(url.hostname, port, deadline)
    host_header = url.hostname if url.port is None else f"{url.hostname}:{url.port}"
    conn = http.client.HTTPConnection(url.hostname, port)
    conn.sock = sock
    path = url.path or "/"
    if url.query:
        path += "?" + url.query
    headers = {"Host": host_header, "User-Agent": "l7gate-lab-client", "Accept": "*/*"}
    for h in args.header:
        k, _, v = h.partition(":")
        headers[k.strip()] = v.strip()
    body = args.data.encode() if args.data is not None else None
    try:
        with _io_errors("request"):
            sock.settimeout(deadline.left("request"))
            conn.request(args.method, path, body=body, headers=headers)
        with _io_errors("response"):
            sock.settimeout(deadline.left("response"))
            resp = conn.getresponse()
            data = resp.read()
    finally:
        conn.close()
    if args.include:
        out.write(f"HTTP/1.1 {resp.status} {resp.reason}\r\n".encode())
        for k, v in resp.getheaders():
            out.write(f"{k}: {v}\r\n".encode())
        out.write(b"\r\n")
    out.write(data)
    out.flush()
    return 22 if args.fail and resp.status >= 400 else 0


def tcp_request(args, deadline: Deadline, out) -> int:
    host, _, port = args.tcp.rpartition(":")
    if not host or not port.isdigit():
        raise SystemExit(f"client: --tcp wants HOST:PORT, got {args.tcp!r}")
    sock = connect(host.strip("[]"), int(port), deadline)
    try:
        with _io_errors("send"):
            sock.settimeout(deadline.left("send"))
            sock.sendall(args.send.encode())
        with _io_errors("response"):
            sock.settimeout(deadline.left("response"))
            data = sock.recv(65536)
    finally:
        sock.close()
    if not data:
        raise Outcome("EMPTY", "server closed the connection without a response")
    out.write(data)
    out.flush()
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="client", description=__doc__.splitlines()[0])
    ap.add_argument("--url", help="http://HOST[:PORT]/PATH")
    ap.add_argument("-X", "--method", default="GET")
    ap.add_argument("-H", "--header", action="append", default=[], metavar="NAME: VALUE")
    ap.add_argument("-d", "--data", help="request body")
    ap.add_argument("-i", "--include", action="store_true", help="print status line and headers")
    ap.add_argument("-f", "--fail", action="store_true", help="exit 22 on an HTTP status >= 400")
    ap.add_argument("--tcp", metavar="HOST:PORT", help="raw TCP instead of HTTP: send, print the reply")
    ap.add_argument("--send", default="ping\n", help="what --tcp sends (default: ping)")
    ap.add_argument("--timeout", type=float, default=5.0, help="seconds for the whole exchange (default 5)")
    args = ap.parse_args(argv)
    if bool(args.url) == bool(args.tcp):
        ap.error("give --url or --tcp")
    out = sys.stdout.buffer
    deadline = Deadline(args.timeout)
    try:
        return tcp_request(args, deadline, out) if args.tcp else http_request(args, deadline, out)
    except Outcome as o:
        print(o.word, flush=True)
        print(f"client: {o.detail}", file=sys.stderr, flush=True)
        return CODES[o.word]


if __name__ == "__main__":
    raise SystemExit(main())
