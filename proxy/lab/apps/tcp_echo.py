"""TCP echo server (default :27017): the MongoDB stand-in of the sock-shop demo.

Echoes every byte back until the peer closes. `--port` may be repeated.
"""
from __future__ import annotations

import argparse
import asyncio

from proxy.lab.apps._serve import run


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def serve(ports: list[int], stop: asyncio.Event) -> None:
    servers = [await asyncio.start_server(_echo, "0.0.0.0", p, reuse_address=True) for p in ports]
    await stop.wait()
    for s in servers:
        s.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="tcp-echo", description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, action="append", help="listen port (repeatable; default 27017)")
    args = ap.parse_args(argv)
    return run(lambda stop: serve(args.port or [27017], stop))


if __name__ == "__main__":
    raise SystemExit(main())
