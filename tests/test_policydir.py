"""The agent keeps the last good version of a policy file when a new version is invalid."""
import os
import time

from proxy.agent.policydir import PolicyDir

GOOD = """apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: p, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: api}}
  ingress: [{toPorts: [{ports: [{port: "%s"}]}]}]
"""
BAD = GOOD.replace("endpointSelector", "endpointSelectr")


def write(path, text):
    path.write_text(text)
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, time.time_ns() + 1_000_000))  # a visible mtime change


def ports(pd):
    return sorted(p.rules[0].ingress[0].to_ports[0].ports[0].port for p in pd.policies())


def test_invalid_new_version_keeps_previous(tmp_path):
    f = tmp_path / "p.yaml"
    write(f, GOOD % 80)
    pd = PolicyDir(tmp_path)
    assert pd.poll() and ports(pd) == ["80"]
    write(f, BAD % 81)
    assert pd.poll()
    assert ports(pd) == ["80"] and pd.errors
    write(f, GOOD % 82)
    pd.poll()
    assert ports(pd) == ["82"] and not pd.errors


def test_never_valid_file_contributes_nothing_and_others_load(tmp_path):
    write(tmp_path / "a.yaml", BAD % 80)
    write(tmp_path / "b.yaml", GOOD.replace("name: p", "name: q") % 90)
    pd = PolicyDir(tmp_path)
    pd.poll()
    assert ports(pd) == ["90"]


def test_deleted_file_removes_its_policies_and_unchanged_dir_is_not_reloaded(tmp_path):
    f = tmp_path / "p.yaml"
    write(f, GOOD % 80)
    pd = PolicyDir(tmp_path)
    pd.poll()
    assert pd.poll() is False
    f.unlink()
    assert pd.poll() and pd.policies() == []
