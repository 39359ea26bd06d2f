"""bench/run's reference: the least a Python HTTP gateway does, on the stack the issue names.

uvloop + httptools, one process: each request on a keep-alive connection is parsed (llhttp,
method and URL) and checked against the same ACL as HAProxy's and l7gate's (`GET /bench`, else
`403 Access denied`); allowed requests go byte for byte to the backend on one upstream
connection per client, whose responses are parsed only to see where they end. No flows, no
metrics, no path normalisation, no smuggling checks, no ordering of pipelined answers, no
original destination: a ceiling to read l7gate's figures against, not a proxy to use.

    python bench/bare.py --port 8081 --upstream 127.0.0.1:80
"""
from __future__ import annotations

import argparse
import asyncio

import httptools
import uvloop

DENIED = (b"HTTP/1.1 403 Forbidden\r\ncontent-length: 15\r\ncontent-type: text/plain\r\n\r\n"
          b"Access denied\r\n")


class Upstream(asyncio.Protocol):
    def __init__(self, client: Client) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None
        self.pending: list[bytes] = []
        self.responses = httptools.HttpResponseParser(self)

    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.writelines(self.pending)
        self.pending = []

    def data_received(self, data: bytes) -> None:
        self.responses.feed_data(data)  # where each response ends (raises on a malformed one)
        self.client.transport.write(data)

    def connection_lost(self, exc) -> None:
        self.client.transport.close()

    def send(self, data: bytes) -> None:
        if self.transport is None:
            self.pending.append(data)
        else:
            self.transport.write(data)


class Client(asyncio.Protocol):
    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream_address = upstream
        self.transport: asyncio.Transport | None = None
        self.upstream: Upstream | None = None
        self.requests = httptools.HttpRequestParser(self)
        self.url = b""
        self.verdicts: list[bool] = []

    def connection_made(self, transport) -> None:
        self.transport = transport

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_headers_complete(self) -> None:
        self.verdicts.append(self.requests.get_method() == b"GET" and self.url == b"/bench")
        self.url = b""

    def data_received(self, data: bytes) -> None:
        self.verdicts = []
        try:
            self.requests.feed_data(data)
        except httptools.HttpParserError:
            self.transport.close()
            return
        if all(self.verdicts):  # one request per read with wrk: allowed whole, or answered 403
            if self.upstream is None:
                self.upstream = Upstream(self)
                loop = asyncio.get_running_loop()
                loop.create_task(loop.create_connection(lambda: self.upstream, *self.upstream_address))
            self.upstream.send(data)
        else:
            self.transport.write(DENIED * len(self.verdicts))

    def connection_lost(self, exc) -> None:
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.close()


async def main(port: int, upstream: tuple[str, int]) -> None:
    loop = asyncio.get_running_loop()
    await loop.create_server(lambda: Client(upstream), "0.0.0.0", port, reuse_address=True, backlog=1024)
    await asyncio.Event().wait()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, default=8081)
    p.add_argument("--upstream", default="127.0.0.1:80", help="HOST:PORT of the backend")
    a = p.parse_args()
    host, _, up_port = a.upstream.rpartition(":")
    uvloop.run(main(a.port, (host, int(up_port))))
