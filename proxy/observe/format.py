"""Print flows the way `hubble observe` does (spec §11.3).

  compact  `May  4 13:23:43.791: default/tiefighter:42742 (ID:25698) -> default/deathstar-...:80
           (ID:6822) http-request DROPPED (HTTP/1.1 PUT http://...)`; replies (`is_reply: true`)
           are flipped so the client stays on the left and drawn `<-`; unknown direction `<>`
  json     one GetFlowsResponse per line: `{"flow": {...}, "node_name": ..., "time": ...}`
  jsonpb   the same (current hubble treats json as jsonpb)
  table    TIMESTAMP [NODE] SOURCE DESTINATION TYPE VERDICT SUMMARY, columns aligned
  dict     one `KEY: value` block per flow, separated by `------------`
Times are UTC (hubble prints `Timestamp.AsTime()`, which is UTC) in Go's StampMilli layout.
"""
from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from typing import IO

from proxy.observe.flow import flow_type_name, parse_time, rfc3339

OUTPUTS = ("compact", "json", "jsonpb", "table", "dict")
RESERVED_IDENTITIES = {1: "host", 2: "world", 3: "unmanaged", 4: "health", 5: "init",
                       6: "remote-node", 7: "kube-apiserver", 8: "ingress", 9: "world-ipv4",
                       10: "world-ipv6", 11: "encrypted-overlay"}
MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def stamp_milli(time_text: str) -> str:
    """RFC 3339 -> Go's `Jan _2 15:04:05.000` (UTC, milliseconds truncated); `N/A` if unreadable."""
    try:
        ns = parse_time(time_text)
    except (ValueError, TypeError, OverflowError):
        return "N/A"
    sec, frac = divmod(ns, 1_000_000_000)
    t = datetime.fromtimestamp(sec, timezone.utc)
    return f"{MONTHS[t.month - 1]} {t.day:2d} {t:%H:%M:%S}.{frac // 1_000_000:03d}"


def identity_text(identity: int) -> str:
    """`(world)` for reserved identities, `(ID:12345)` otherwise."""
    identity = int(identity or 0)
    if 0 < identity < 256:
        return f"({RESERVED_IDENTITIES.get(identity, identity)})"
    return f"(ID:{identity})"


def _ports(flow: dict) -> tuple[str, str]:
    l4 = flow.get("l4", {})
    for proto in ("TCP", "UDP", "SCTP"):
        if proto in l4:
            return str(l4[proto].get("source_port", 0)), str(l4[proto].get("destination_port", 0))
    return "", ""


def _hostname(ip: str, port: str, endpoint: dict, service: dict | None, names: list[str]) -> str:
    ns, pod = endpoint.get("namespace", ""), endpoint.get("pod_name", "")
    host = ip
    if pod:
        host = f"{ns}/{pod}" if ns else pod
    elif service and service.get("name"):
        ns = service.get("namespace", ns)
        host = f"{ns}/{service['name']}" if ns else service["name"]
    elif names:
        host = ",".join(names)
    if port and port != "0":
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return host


def host_names(flow: dict) -> tuple[str, str]:
    ip = flow.get("IP")
    if not ip:
        return "", ""
    sport, dport = _ports(flow)
    return (_hostname(ip.get("source", ""), sport, flow.get("source", {}), flow.get("source_service"),
                      flow.get("source_names", [])),
            _hostname(ip.get("destination", ""), dport, flow.get("destination", {}),
                      flow.get("destination_service"), flow.get("destination_names", [])))


def verdict_text(flow: dict) -> str:
    v = flow.get("verdict", "VERDICT_UNKNOWN")
    if flow.get("event_type", {}).get("type") == 5:  # policy-verdict events
        return {"FORWARDED": "ALLOWED", "REDIRECTED": "ALLOWED", "DROPPED": "DENIED",
                "ERROR": "DENIED", "AUDIT": "AUDITED"}.get(v, v)
    return v


def deciding_policies(flow: dict) -> list[dict]:
    """The policies behind the flow's verdict: `<dir>_denied_by` for drops, else `_allowed_by`."""
    kind = "denied" if flow.get("verdict") in ("DROPPED", "ERROR") else "allowed"
    direction = flow.get("traffic_direction", "").lower()
    dirs = [direction] if direction in ("ingress", "egress") else ["ingress", "egress"]
    return [p for d in dirs for p in flow.get(f"{d}_{kind}_by", [])]


def policy_names_text(flow: dict) -> str:
    pols = deciding_policies(flow)
    if not pols:
        return ""
    return " BY " + ", ".join(f"{p.get('name', '')} ({p.get('kind', '')})" for p in pols)


def compact(flow: dict, print_policy_names: bool = False, node_name: bool = False) -> str:
    src, dst = host_names(flow)
    src_id = identity_text(flow.get("source", {}).get("identity", 0))
    dst_id = identity_text(flow.get("destination", {}).get("identity", 0))
    reply = flow.get("is_reply")
    if reply is None:
        arrow = "<>"
    elif reply:
        src, dst, src_id, dst_id, arrow = dst, src, dst_id, src_id, "<-"
    else:
        arrow = "->"
    node = f" [{flow.get('node_name', '')}]" if node_name else ""
    verdict = verdict_text(flow) + (policy_names_text(flow) if print_policy_names else "")
    return (f"{stamp_milli(flow.get('time', ''))}{node}: {src} {src_id} {arrow} {dst} {dst_id} "
            f"{flow_type_name(flow)} {verdict} ({flow.get('Summary', '')})")


def response(flow: dict) -> dict:
    """The GetFlowsResponse wrapping one flow."""
    return {"flow": flow, "node_name": flow.get("node_name", ""), "time": flow.get("time", "")}


def json_line(flow: dict) -> str:
    return json.dumps(response(flow), separators=(",", ":"))


def table_row(flow: dict, node_name: bool = False) -> list[str]:
    src, dst = host_names(flow)
    row = [stamp_milli(flow.get("time", ""))]
    if node_name:
        row.append(flow.get("node_name", ""))
    return row + [src, dst, flow_type_name(flow), verdict_text(flow), flow.get("Summary", "")]


def table_header(node_name: bool = False) -> list[str]:
    return ["TIMESTAMP"] + (["NODE"] if node_name else []) + \
        ["SOURCE", "DESTINATION", "TYPE", "VERDICT", "SUMMARY"]


def align(rows: list[list[str]], padding: int = 3) -> str:
    """Go tabwriter (minwidth 2, padding 3): every column but the last padded to its widest cell."""
    if not rows:
        return ""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return "".join("".join(c.ljust(max(widths[i] + padding, 2)) for i, c in enumerate(r[:-1]))
                   + r[-1] + "\n" for r in rows)


def dict_block(flow: dict, node_name: bool = False) -> str:
    src, dst = host_names(flow)
    lines = [f"  TIMESTAMP: {stamp_milli(flow.get('time', ''))}"]
    if node_name:
        lines.append(f"       NODE: {flow.get('node_name', '')}")
    lines += [f"     SOURCE: {src}", f"DESTINATION: {dst}", f"       TYPE: {flow_type_name(flow)}",
              f"    VERDICT: {verdict_text(flow)}", f"    SUMMARY: {flow.get('Summary', '')}"]
    return "\n".join(lines) + "\n"


class Printer:
    """Writes flows in one output format; `close()` flushes what needs all rows (table)."""

    def __init__(self, out: IO[str], output: str = "compact", print_policy_names: bool = False,
                 node_name: bool = False, follow: bool = False) -> None:
        if output not in OUTPUTS:
            raise ValueError(f"unknown output {output!r}")
        self.out, self.output = out, output
        self.print_policy_names, self.node_name, self.follow = print_policy_names, node_name, follow
        self.count = 0
        self._rows: list[list[str]] = []
        self._widths: list[int] | None = None

    def write(self, flow: dict) -> None:
        o = self.output
        if o == "compact":
            self.out.write(compact(flow, self.print_policy_names, self.node_name) + "\n")
        elif o in ("json", "jsonpb"):
            self.out.write(json_line(flow) + "\n")
        elif o == "dict":
            if self.count:
                self.out.write("------------\n")
            self.out.write(dict_block(flow, self.node_name))
        else:
            row = table_row(flow, self.node_name)
            if self.follow:  # stream: column widths fixed by the header and the first row
                if self._widths is None:
                    header = table_header(self.node_name)
                    self._widths = [max(len(a), len(b)) for a, b in zip(header[:-1], row[:-1])]
                    self.out.write(self._line(header))
                self.out.write(self._line(row))
            else:
                self._rows.append(row)
        self.count += 1
        if self.follow:
            self.out.flush()

    def _line(self, row: list[str]) -> str:
        return "".join(c.ljust(w + 3) for c, w in zip(row[:-1], self._widths)) + row[-1] + "\n"

    def lost(self, count: int, source: str = "HUBBLE_RING_BUFFER", node: str = "") -> str:
        """The line hubble prints (on stderr) for lost events."""
        if self.output in ("json", "jsonpb"):
            return json.dumps({"lost_events": {"source": source, "num_events_lost": str(count)},
                               "node_name": node, "time": rfc3339(time.time_ns())}, separators=(",", ":"))
        return f"EVENTS LOST: {source} CPU(0) {count}"

    def close(self) -> None:
        if self.output == "table" and not self.follow and self._rows:
            self.out.write(align([table_header(self.node_name)] + self._rows))
        self.out.flush()
