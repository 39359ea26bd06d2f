"""`l7gate observe`: flows from every agent of a registry, like `hubble observe` through a relay.

Protocol (an extension of the control socket's JSON lines, `proxy.agent.control`): the client
sends one line
    {"cmd": "observe", "filter": {...FlowFilter fields...}, "since": "RFC3339" | null,
     "last": N | null, "follow": true | false}
and the agent answers with one line per flow, each a GetFlowsResponse
    {"flow": {...}, "node_name": "...", "time": "..."}
then `{"ok": true, "history_end": true}` once the history (ring contents matching filter, since
and last) is sent. Without follow the agent closes the connection there; with follow it goes on
with every new matching flow until the client disconnects, with
    {"lost_events": {"source": "HUBBLE_RING_BUFFER", "num_events_lost": "N"}, ...}
when the client read too slowly. A bad request gets `{"ok": false, "error": "..."}`.
`handle_observe` is the agent's side; `run` is the CLI's.

The client merges: histories are sorted by time and cut to the global `--last N`; live flows are
printed as they arrive. While following, agents that appear in the registry later are joined too.
Defaults as hubble: no --follow/--last/--since means --last 20; --follow alone starts from now.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import IO

from proxy.observe.filters import FilterError, FlowFilter
from proxy.observe.flow import parse_time, rfc3339
from proxy.observe.format import OUTPUTS, Printer, json_line
from proxy.observe.ring import FlowRing

DEFAULT_LAST = 20  # hubble's default when neither --follow, --last nor --since is given
REGISTRY_FALLBACK = "/run/l7gate/registry"
HISTORY_END = {"ok": True, "history_end": True}
CONNECT_TIMEOUT = 3.0
HISTORY_TIMEOUT = 5.0
RESCAN = 1.0
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_DURATIONS = re.compile(r"(?:\d+(?:\.\d+)?(?:ns|us|µs|ms|s|m|h))+")
_UNITS = {"ns": 1, "us": 1_000, "µs": 1_000, "ms": 1_000_000, "s": 1_000_000_000,
          "m": 60_000_000_000, "h": 3_600_000_000_000}


def parse_since(text: str, now_ns: int | None = None) -> int:
    """`30s`, `5m`, `1h30m`, `500ms` (before now) or an RFC 3339 time -> ns since the epoch."""
    text = text.strip()
    now_ns = time.time_ns() if now_ns is None else now_ns
    if _DURATIONS.fullmatch(text):
        total = sum(float(n) * _UNITS[u] for n, u in _DURATION.findall(text))
        return now_ns - int(total)
    try:
        return parse_time(text)
    except ValueError:
        raise ValueError(f"--since: {text!r} is neither a duration (30s, 5m, 1h) "
                         "nor an RFC 3339 time") from None


# -- agent side -----------------------------------------------------------------------------------
def _write(writer: asyncio.StreamWriter, obj: dict | str) -> None:
    line = obj if isinstance(obj, str) else json.dumps(obj, separators=(",", ":"))
    writer.write(line.encode() + b"\n")


async def handle_observe(ring: FlowRing, request: dict, writer: asyncio.StreamWriter,
                         reader: asyncio.StreamReader | None = None, max_queue: int = 4096) -> None:
    """Answer one `observe` request on a control connection (see the module docstring).
    Returns when the history is sent (no follow) or when the client goes away (follow)."""
    try:
        flt = FlowFilter.from_dict(request.get("filter"))
        since = request.get("since")
        since_ns = (parse_time(since) if isinstance(since, str) else int(since)) if since else None
        last = request.get("last")
        if last is not None and (not isinstance(last, int) or last < 0):
            raise ValueError("last must be a non-negative integer")
        follow = bool(request.get("follow"))
    except (ValueError, TypeError) as e:
        _write(writer, {"ok": False, "error": f"bad observe request: {e}"})
        await writer.drain()
        return
    follower = ring.follow(max_queue) if follow else None  # before the snapshot: no gap
    eof: asyncio.Future | None = None
    try:
        upto = ring.seq
        if follow and since_ns is None and last is None:
            history = []
        else:
            history = ring.snapshot(flt, since_ns, last, upto_seq=upto)
        for _, f in history:
            _write(writer, json_line(f))
        _write(writer, HISTORY_END)
        await writer.drain()
        if follower is None:
            return
        if reader is not None:
            eof = asyncio.ensure_future(reader.read(1))
        while True:
            batch_task = asyncio.ensure_future(follower.next_batch())
            waiting = {batch_task} | ({eof} if eof is not None else set())
            done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            if batch_task not in done:  # the client closed its side
                batch_task.cancel()
                return
            try:
                batch = batch_task.result()
            except StopAsyncIteration:
                return
            lost = follower.take_lost()
            if lost:
                _write(writer, {"lost_events": {"source": "HUBBLE_RING_BUFFER",
                                                "num_events_lost": str(lost)},
                                "node_name": "", "time": rfc3339(time.time_ns())})
            for seq, f in batch:
                if seq > upto and flt(f):
                    _write(writer, json_line(f))
            await writer.drain()
            if eof is not None and eof.done():
                return
    except (ConnectionError, asyncio.IncompleteReadError):
        return
    finally:
        if follower is not None:
            follower.close()
        if eof is not None and not eof.done():
            eof.cancel()


# -- CLI side -------------------------------------------------------------------------------------
def add_parser_arguments(parser: argparse.ArgumentParser, default_registry: str | None = None) -> None:
    """The `l7gate observe` flags (hubble observe's names)."""
    parser.add_argument("-f", "--follow", action="store_true", help="keep printing new flows")
    parser.add_argument("-n", "--last", type=int, metavar="N",
                        help=f"the last N flows (default {DEFAULT_LAST} without --follow/--since)")
    parser.add_argument("--since", metavar="DURATION|TIME",
                        help="flows since a duration ago (30s, 5m, 1h) or an RFC 3339 time")
    parser.add_argument("--pod", action="append", default=[], metavar="[NS/]NAME",
                        help="flows from or to this pod (name prefix; namespace default 'default')")
    parser.add_argument("--from-pod", action="append", default=[], metavar="[NS/]NAME")
    parser.add_argument("--to-pod", action="append", default=[], metavar="[NS/]NAME")
    parser.add_argument("--namespace", action="append", default=[], metavar="NS",
                        help="flows from or to this namespace")
    parser.add_argument("--verdict", action="append", default=[], metavar="V",
                        help="FORWARDED, DROPPED, ERROR, AUDIT, REDIRECTED")
    parser.add_argument("--protocol", action="append", default=[], metavar="P",
                        help="http, dns, tcp, udp, sctp, icmp, icmpv4, icmpv6")
    parser.add_argument("--label", action="append", default=[], metavar="k=v",
                        help="source or destination labels (k=v,k2=v2: all of them)")
    parser.add_argument("--type", action="append", default=[], metavar="T",
                        help="l7, drop, trace, policy-verdict")
    parser.add_argument("--print-policy-names", action="store_true",
                        help="append ' BY <policy> (<kind>)' to verdicts a policy decided")
    parser.add_argument("--print-node-name", action="store_true",
                        help="print the observing agent's name")
    parser.add_argument("-o", "--output", choices=OUTPUTS, default="compact")
    parser.add_argument("--registry", default=os.environ.get("L7GATE_REGISTRY",
                                                             default_registry or REGISTRY_FALLBACK),
                        help="registry directory shared by the agents (env L7GATE_REGISTRY)")


def _metrics_address(text: str) -> str:
    from proxy.observe.metrics import parse_address  # noqa: PLC0415 (keeps prometheus out of the CLI)
    try:
        parse_address(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number")
    return int(text)


def add_agent_arguments(parser: argparse.ArgumentParser) -> None:
    """The flow/metrics flags of `l7gate run`: --metrics ADDR, --flow-buffer N, --log-allowed."""
    parser.add_argument("--metrics", type=_metrics_address, metavar="ADDR",
                        help="serve Prometheus /metrics on ADDR (HOST:PORT, :PORT = 127.0.0.1; "
                             "off by default, all interfaces only if 0.0.0.0 / [::] is given)")
    parser.add_argument("--flow-buffer", type=_positive, default=4096, metavar="N",
                        help="flows kept for `l7gate observe` (default 4096)")
    parser.add_argument("--log-allowed", action="store_true",
                        help="also log allowed NEW connections (policy-verdict ALLOWED flows)")


def request_from_args(args: argparse.Namespace, now_ns: int | None = None) -> dict:
    flt = FlowFilter(pods=args.pod, from_pods=args.from_pod, to_pods=args.to_pod,
                     namespaces=getattr(args, "namespace", []) or [], verdicts=args.verdict,
                     protocols=args.protocol, labels=args.label, types=getattr(args, "type", []) or [])
    since = rfc3339(parse_since(args.since, now_ns)) if args.since else None
    last = args.last
    if last is not None and last < 0:
        raise ValueError("--last must not be negative")
    if not args.follow and last is None and since is None:
        last = DEFAULT_LAST
    return {"cmd": "observe", "filter": flt.to_dict(), "since": since, "last": last,
            "follow": bool(args.follow)}


def _sockets(registry: str) -> list[Path]:
    return sorted(Path(registry, "agents").glob("*.sock"))


class _Agent:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.error: Exception | None = None

    async def open(self, request: dict) -> bool:
        try:
            self.reader, self.writer = await asyncio.wait_for(
                asyncio.open_unix_connection(str(self.path), limit=1 << 24), CONNECT_TIMEOUT)
            self.writer.write(json.dumps(request).encode() + b"\n")
            await self.writer.drain()
            return True
        except (OSError, asyncio.TimeoutError) as e:
            self.error = e
            return False

    async def line(self) -> dict | None:
        """The next message; None at EOF or on garbage (the agent went away)."""
        try:
            raw = await self.reader.readline()
        except (OSError, ValueError, asyncio.LimitOverrunError):
            return None
        if not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            return None

    async def history(self) -> tuple[list[dict], str | None]:
        """Flows up to the history marker; (flows, error or None)."""
        flows = []
        while True:
            msg = await self.line()
            if msg is None:
                return flows, None
            if msg.get("history_end"):
                return flows, None
            if msg.get("ok") is False:
                return flows, msg.get("error", "agent error")
            if "flow" in msg:
                flows.append(msg["flow"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _sort_key(flow: dict) -> int:
    try:
        return parse_time(flow.get("time", ""))
    except ValueError:
        return 0


async def _observe(args, request: dict, printer: Printer, err: IO[str]) -> int:
    flt = FlowFilter.from_dict(request["filter"])
    since_ns = parse_time(request["since"]) if request["since"] else None
    agents: dict[Path, _Agent] = {}
    refused = False
    for path in _sockets(args.registry):
        a = _Agent(path)
        if await a.open(request):
            agents[path] = a
        refused |= isinstance(a.error, PermissionError)
    if not agents:
        why = "permission denied on the agents' sockets (run as root)" if refused else \
            "is `l7gate run` or a lab up?"
        print(f"l7gate: no agent answers in {args.registry} ({why})", file=err)
        return 1
    results = await asyncio.gather(*(asyncio.wait_for(a.history(), HISTORY_TIMEOUT)
                                     for a in agents.values()), return_exceptions=True)
    flows, errors = [], 0
    for path, res in zip(list(agents), results):
        if isinstance(res, BaseException):
            print(f"l7gate: agent {path.stem} did not answer in time", file=err)
            errors += 1
            continue
        got, error = res
        if error:
            print(f"l7gate: agent {path.stem}: {error}", file=err)
            errors += 1
        flows.extend(got)
    flows = [f for f in flows if flt(f) and (since_ns is None or _sort_key(f) >= since_ns)]
    flows.sort(key=_sort_key)
    if request["last"] is not None:
        flows = flows[-request["last"]:] if request["last"] else []
    for f in flows:
        printer.write(f)
    if not request["follow"]:
        for a in agents.values():
            a.close()
        return 1 if errors and errors == len(agents) else 0
    return await _follow(args, request, agents, printer, err, flt)


async def _follow(args, request: dict, agents: dict, printer: Printer, err: IO[str],
                  flt: FlowFilter) -> int:
    started = rfc3339(time.time_ns())
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(a: _Agent) -> None:
        while True:
            msg = await a.line()
            if msg is None:
                return
            await queue.put((a, msg))

    tasks = {asyncio.ensure_future(pump(a)) for a in agents.values()}

    async def rescan() -> None:
        while True:
            await asyncio.sleep(RESCAN)
            for path in _sockets(args.registry):
                if path in agents:
                    continue
                a = _Agent(path)
                late = dict(request, since=started, last=None)  # flows since we started following
                if await a.open(late):
                    agents[path] = a
                    tasks.add(asyncio.ensure_future(pump(a)))

    scanner = asyncio.ensure_future(rescan())
    try:
        while True:
            _, msg = await queue.get()
            if "flow" in msg and flt(msg["flow"]):
                printer.write(msg["flow"])
            elif "lost_events" in msg:
                n = int(msg["lost_events"].get("num_events_lost", 0))
                print(printer.lost(n, msg["lost_events"].get("source", "")), file=err)
    finally:
        scanner.cancel()
        for t in tasks:
            t.cancel()
        for a in agents.values():
            a.close()


def run(args: argparse.Namespace, out: IO[str], err: IO[str] | None = None) -> int:
    """`l7gate observe`: print flows from every agent in `args.registry`. Exit 0, or 1 when no
    agent answers, 2 on bad arguments."""
    err = err or sys.stderr
    try:
        request = request_from_args(args)
    except (ValueError, FilterError) as e:
        print(f"l7gate observe: {e}", file=err)
        return 2
    printer = Printer(out, args.output, args.print_policy_names,
                      getattr(args, "print_node_name", False), follow=args.follow)
    try:
        return asyncio.run(_observe(args, request, printer, err))
    except KeyboardInterrupt:
        return 0
    finally:
        printer.close()
