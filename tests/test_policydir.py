"""The agent keeps the last good version of a policy file when a new version is invalid, or
half-written, or when the directory cannot be read."""
import os
import shutil
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
    pd = PolicyDir(tmp_path, settle=0)
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
    pd = PolicyDir(tmp_path, settle=0)
    pd.poll()
    assert ports(pd) == ["90"]


def test_deleted_file_removes_its_policies_and_unchanged_dir_is_not_reloaded(tmp_path):
    f = tmp_path / "p.yaml"
    write(f, GOOD % 80)
    pd = PolicyDir(tmp_path, settle=0)
    pd.poll()
    assert pd.poll() is False
    f.unlink()
    assert pd.poll() and pd.policies() == []


def test_a_file_is_read_only_once_it_stopped_changing(tmp_path):
    """Editors, cp and > truncate a file, then fill it: read in between, it is an empty or a
    shorter (broader) policy. A changed file is read once untouched for `settle` seconds."""
    f = tmp_path / "p.yaml"
    now = [0.0]
    pd = PolicyDir(tmp_path, settle=0.5, clock=lambda: now[0])

    def written(text: str, age: float = 0.0) -> None:  # the clock: `age` after the write
        f.write_text(text)
        now[0] = os.stat(f).st_mtime + age

    written(GOOD % 80)
    assert pd.poll() and pd.policies() == [] and pd.settling == [str(f)], "too fresh: not yet"
    now[0] += 1
    assert pd.poll() and ports(pd) == ["80"] and pd.settling == []
    written("")  # truncated...
    assert pd.poll() and ports(pd) == ["80"], "a file being rewritten keeps its previous version"
    half = GOOD % 81
    written(half[:half.index("  ingress")] + "  ingress: [{}]\n", age=0.2)  # ...shorter...
    pd.poll()
    assert ports(pd) == ["80"]
    written(GOOD % 81, age=0.2)  # ...then whole
    pd.poll()
    assert ports(pd) == ["80"]
    now[0] += 1
    assert pd.poll() and ports(pd) == ["81"]


def test_a_directory_that_cannot_be_read_changes_nothing(tmp_path):
    d = tmp_path / "policies"
    d.mkdir()
    write(d / "p.yaml", GOOD % 80)
    pd = PolicyDir(d, settle=0)
    assert pd.poll() and ports(pd) == ["80"] and pd.problem is None
    shutil.move(d, tmp_path / "elsewhere")
    assert pd.poll() is False and ports(pd) == ["80"] and "cannot read" in pd.problem
    shutil.move(tmp_path / "elsewhere", d)
    sub = d / "team"
    sub.mkdir()
    write(sub / "q.yaml", GOOD.replace("name: p", "name: q") % 90)
    os.chmod(sub, 0)
    try:
        if os.access(sub, os.R_OK):  # root ignores modes (CAP_DAC_OVERRIDE): nothing to test
            return
        assert pd.poll() is False and ports(pd) == ["80"] and "cannot read" in pd.problem
    finally:
        os.chmod(sub, 0o755)
    assert pd.poll() and ports(pd) == ["80", "90"] and pd.problem is None


def test_any_change_is_seen_whatever_the_case_of_the_suffix_or_the_times(tmp_path):
    pd = PolicyDir(tmp_path, settle=0)
    up = tmp_path / "WEB.YAML"
    write(up, GOOD % 80)
    assert pd.poll() and ports(pd) == ["80"], "listed as the loader lists files"
    same = tmp_path / "next.yaml"
    same.write_text(GOOD % 81)
    st = os.stat(up)
    os.utime(same, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(same, up)  # same size and mtime (cp -p, rsync -t), another file
    assert pd.poll() and ports(pd) == ["81"]
    up.unlink()
    assert pd.poll() and pd.policies() == []
