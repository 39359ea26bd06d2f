"""Output formats and filters of `l7gate observe` (hubble observe's)."""
from __future__ import annotations

import io
import json

import pytest

from proxy.observe.filters import FilterError, FlowFilter
from proxy.observe.format import Printer, identity_text, stamp_milli
from proxy.observe.relay import parse_since
from test_observe_flow import CASES, build

FLOWS = [f for c in CASES for f in build(c)]


def by_name(prefix: str) -> list[dict]:
    return build(next(c for c in CASES if c["name"].startswith(prefix)))


@pytest.mark.parametrize("text,expected", [
    ("2023-05-04T13:23:43.791999Z", "May  4 13:23:43.791"),  # truncated, not rounded
    ("2023-12-25T01:02:03Z", "Dec 25 01:02:03.000"),
    ("garbage", "N/A"),
])
def test_stamp_milli_is_gos_layout(text, expected):
    assert stamp_milli(text) == expected


@pytest.mark.parametrize("ident,text", [(2, "(world)"), (1, "(host)"), (4, "(health)"),
                                        (9, "(world-ipv4)"), (200, "(200)"), (25698, "(ID:25698)"),
                                        (0, "(ID:0)")])
def test_identities_print_like_hubble(ident, text):
    assert identity_text(ident) == text


@pytest.mark.parametrize("output", ["json", "jsonpb"])
def test_json_is_one_get_flows_response_per_line(output):
    out = io.StringIO()
    p = Printer(out, output)
    for f in FLOWS:
        p.write(f)
    p.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == len(FLOWS)
    for line, f in zip(lines, FLOWS):
        msg = json.loads(line)
        assert set(msg) == {"flow", "node_name", "time"}
        assert msg["flow"] == f and msg["time"] == f["time"]
        for field in ("time", "verdict", "IP", "source", "destination", "Type", "event_type", "Summary"):
            assert field in msg["flow"]


def test_table_has_hubbles_columns_aligned():
    out = io.StringIO()
    p = Printer(out, "table")
    for f in by_name("denied L7"):
        p.write(f)
    p.close()
    header, row1, row2 = out.getvalue().splitlines()
    assert header.split() == ["TIMESTAMP", "SOURCE", "DESTINATION", "TYPE", "VERDICT", "SUMMARY"]
    assert header.index("SOURCE") == row1.index("default/tiefighter:44396")
    assert header.index("VERDICT") == row1.index("DROPPED") == row2.index("FORWARDED")
    assert row2.split()[3] == "default/deathstar-b4b8ccfb5-f75xw:80"  # tables do not flip replies


def test_table_streams_when_following():
    out = io.StringIO()
    p = Printer(out, "table", follow=True)
    p.write(FLOWS[0])
    assert out.getvalue().startswith("TIMESTAMP") and len(out.getvalue().splitlines()) == 2


def test_dict_output_separates_flows():
    out = io.StringIO()
    p = Printer(out, "dict")
    for f in by_name("denied L7"):
        p.write(f)
    assert out.getvalue().count("------------") == 1
    assert "    VERDICT: DROPPED" in out.getvalue()


# -- filters ----------------------------------------------------------------------------------
def names(flt: FlowFilter, flows=None) -> list[str]:
    return [f["Summary"] for f in (flows or FLOWS) if flt(f)]


def test_pod_matches_either_side_by_name_prefix_in_the_default_namespace():
    got = [f for f in FLOWS if FlowFilter(pods=["deathstar"])(f)]
    assert got and all("deathstar" in (f["source"].get("pod_name", "") + f["destination"].get("pod_name", ""))
                       for f in got)
    assert not [f for f in FLOWS if FlowFilter(pods=["kube-system/deathstar"])(f)]
    assert [f for f in FLOWS if FlowFilter(pods=["kube-system/"])(f)]  # a whole namespace


def test_from_pod_and_to_pod_look_at_one_side():
    frm = [f for f in FLOWS if FlowFilter(from_pods=["default/xwing"])(f)]
    assert frm and all(f["source"]["pod_name"] == "xwing" for f in frm)
    to = [f for f in FLOWS if FlowFilter(to_pods=["tiefighter"])(f)]
    assert to and all(f["is_reply"] for f in to)  # only responses go to the client


def test_verdict_protocol_type_and_label_filters():
    assert all(f["verdict"] == "DROPPED" for f in FLOWS if FlowFilter(verdicts=["dropped"])(f))
    http = [f for f in FLOWS if FlowFilter(protocols=["http"])(f)]
    assert http and all("http" in f["l7"] for f in http)
    tcp = [f for f in FLOWS if FlowFilter(protocols=["tcp"])(f)]
    assert set(map(id, http)) <= set(map(id, tcp))  # an HTTP flow is a TCP flow
    assert all("ICMPv4" in f["l4"] for f in FLOWS if FlowFilter(protocols=["icmp"])(f))
    drops = [f for f in FLOWS if FlowFilter(types=["drop"])(f)]
    assert drops and all(f["event_type"]["type"] == 1 for f in drops)
    xw = [f for f in FLOWS if FlowFilter(labels=["class=xwing"])(f)]
    assert xw and all(f["source"]["pod_name"] == "xwing" for f in xw)
    assert [f for f in FLOWS if FlowFilter(labels=["k8s:class=xwing,k8s:org=alliance"])(f)] == xw
    assert not [f for f in FLOWS if FlowFilter(labels=["reserved:class=xwing"])(f)]
    assert [f for f in FLOWS if FlowFilter(labels=["class=xwing", "class=nope"])(f)] == xw  # OR


def test_kinds_combine_with_and_values_with_or():
    flt = FlowFilter(pods=["deathstar"], verdicts=["DROPPED", "ERROR"])
    got = [f for f in FLOWS if flt(f)]
    assert {f["verdict"] for f in got} == {"DROPPED", "ERROR"}
    assert all(f["verdict"] in ("DROPPED", "ERROR") for f in got)


def test_filters_travel_as_dicts():
    flt = FlowFilter(pods=["deathstar"], protocols=["HTTP"], labels=["org=empire"])
    again = FlowFilter.from_dict(json.loads(json.dumps(flt.to_dict())))
    assert names(again) == names(flt)
    assert FlowFilter.from_dict({}).empty


@pytest.mark.parametrize("kwargs", [{"protocols": ["gopher"]}, {"types": ["nope"]},
                                    {"labels": [","]}, {"pods": [""]}])
def test_bad_filters_are_refused(kwargs):
    with pytest.raises(FilterError):
        FlowFilter(**kwargs)


def test_unknown_filter_fields_are_refused():
    with pytest.raises(FilterError):
        FlowFilter.from_dict({"podz": ["x"]})


@pytest.mark.parametrize("text,ago", [("30s", 30), ("5m", 300), ("1h30m", 5400), ("500ms", 0.5),
                                      ("1.5h", 5400)])
def test_since_takes_go_durations(text, ago):
    now = 10_000 * 1_000_000_000
    assert parse_since(text, now) == now - int(ago * 1_000_000_000)


def test_since_takes_rfc3339_and_refuses_the_rest():
    assert parse_since("2023-08-21T12:13:20Z") == 1692620000 * 1_000_000_000
    with pytest.raises(ValueError):
        parse_since("yesterday")
