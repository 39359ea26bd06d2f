"""Apply nftables scripts in-process through libnftables (ctypes), in the caller's network namespace.

One `nft` process per change costs milliseconds (~400 elements/s when used per element); one
libnftables call runs a whole script - a table replacement, or thousands of FQDN elements - as
one netlink transaction. Failures raise `NftError` carrying nft's own message.

Namespaces: a netlink socket belongs to the namespace it was opened in, and `setns` is per
thread, so each thread keeps one libnftables context tagged with the network namespace it was
made in (`/proc/thread-self/ns/net`); a thread that moved to another namespace gets a new context.
The agent runs inside the workload's namespace, so its tables land there.

Never does: decide what goes in the table (`compile` does), or run the `nft` binary.
"""
from __future__ import annotations

import ctypes
import json
import os
import threading
from typing import Iterable

from proxy.datapath import compile as dp_compile
from proxy.datapath.constants import TABLE
from proxy.policy.ipaddr import canonical_ip

NFT_CTX_OUTPUT_JSON = 1 << 4


class NftError(RuntimeError):
    """nft refused a script; `message` is what `nft -f` would have printed."""

    def __init__(self, message: str, script: str = "") -> None:
        # nft quotes the offending line; one batch of elements is one (very long) line
        short = "\n".join(line if len(line) <= 400 else line[:400] + " ..." for line in message.strip().splitlines())
        super().__init__(short or "nft failed without a message")
        self.message = message
        self.script = script


_lib = None
_lib_lock = threading.Lock()


def _library():
    global _lib
    with _lib_lock:
        if _lib is None:
            lib = ctypes.CDLL("libnftables.so.1", use_errno=True)
            lib.nft_ctx_new.restype = ctypes.c_void_p
            lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
            lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
            lib.nft_ctx_free.restype = None
            for name in ("nft_ctx_buffer_output", "nft_ctx_buffer_error"):
                getattr(lib, name).argtypes = [ctypes.c_void_p]
                getattr(lib, name).restype = ctypes.c_int
            for name in ("nft_ctx_get_output_buffer", "nft_ctx_get_error_buffer"):
                getattr(lib, name).argtypes = [ctypes.c_void_p]
                getattr(lib, name).restype = ctypes.c_char_p
            lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
            lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
            lib.nft_ctx_output_get_flags.argtypes = [ctypes.c_void_p]
            lib.nft_ctx_output_get_flags.restype = ctypes.c_uint
            lib.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
            lib.nft_ctx_output_set_flags.restype = None
            lib.nft_ctx_set_dry_run.argtypes = [ctypes.c_void_p, ctypes.c_bool]
            lib.nft_ctx_set_dry_run.restype = None
            _lib = lib
    return _lib


class Context:
    """One libnftables context; not thread-safe (use `run`, which keeps one per thread)."""

    def __init__(self) -> None:
        self.lib = _library()
        self.ctx = self.lib.nft_ctx_new(0)
        if not self.ctx:
            raise NftError("nft_ctx_new failed")
        self.lib.nft_ctx_buffer_output(self.ctx)
        self.lib.nft_ctx_buffer_error(self.ctx)

    def run(self, script: str, json_output: bool = False, dry_run: bool = False) -> str:
        lib, ctx = self.lib, self.ctx
        flags = lib.nft_ctx_output_get_flags(ctx)
        if json_output:
            lib.nft_ctx_output_set_flags(ctx, flags | NFT_CTX_OUTPUT_JSON)
        if dry_run:
            lib.nft_ctx_set_dry_run(ctx, True)
        try:
            rc = lib.nft_run_cmd_from_buffer(ctx, script.encode())
            out = (lib.nft_ctx_get_output_buffer(ctx) or b"").decode(errors="replace")
            err = (lib.nft_ctx_get_error_buffer(ctx) or b"").decode(errors="replace")
        finally:
            lib.nft_ctx_output_set_flags(ctx, flags)
            if dry_run:
                lib.nft_ctx_set_dry_run(ctx, False)
        if rc != 0:
            raise NftError(err, script)
        return out

    def close(self) -> None:
        if self.ctx:
            self.lib.nft_ctx_free(self.ctx)
            self.ctx = None

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass


_local = threading.local()


def _netns_id() -> tuple[int, int]:
    st = os.stat("/proc/thread-self/ns/net")
    return st.st_dev, st.st_ino


def _context() -> Context:
    ns = _netns_id()
    ctx = getattr(_local, "ctx", None)
    if ctx is None or _local.ns != ns:
        if ctx is not None:
            ctx.close()  # also releases the old namespace (a socket pins its namespace)
        ctx = _local.ctx = Context()
        _local.ns = ns
    return ctx


def release() -> None:
    """Free this thread's context (and with it the namespace its socket pins)."""
    ctx = getattr(_local, "ctx", None)
    if ctx is not None:
        ctx.close()
        _local.ctx = None


def run(script: str, json_output: bool = False) -> str:
    """Run an nft script (any commands) in this thread's network namespace; returns nft's output."""
    return _context().run(script, json_output=json_output)


def check(script: str) -> None:
    """Parse and validate `script` against the kernel without committing it (`nft -c -f`)."""
    _context().run(script, dry_run=True)


def apply(script: str) -> None:
    """Apply one script as one transaction (all of it, or none of it)."""
    run(script)


def list_table(table: str = TABLE) -> str:
    """`nft list table inet <table>`; NftError if it does not exist."""
    return run(f"list table inet {table}\n")


def table_exists(table: str = TABLE) -> bool:
    try:
        list_table(table)
    except NftError:
        return False
    return True


def delete_table(table: str = TABLE) -> None:
    """Remove our table if present (idempotent); nothing else is touched."""
    run(f"add table inet {table}\ndelete table inet {table}\n")


def _norm(ip: str) -> str:
    return canonical_ip(ip)


def fqdn_elements(table: str = TABLE, name: str = "fqdn") -> dict[str, tuple[int, int | None]]:
    """An FQDN map (`fqdn`, or `fqdnz` for established connections) as it is now:
    ip -> (identity, seconds until expiry or None)."""
    out: dict[str, tuple[int, int | None]] = {}
    for v in (4, 6):
        doc = json.loads(run(f"list map inet {table} {name}{v}\n", json_output=True))
        for item in doc.get("nftables", []):
            for key, ident in item.get("map", {}).get("elem", []):
                if isinstance(key, dict):
                    elem = key["elem"]
                    out[_norm(elem["val"])] = (int(ident), elem.get("expires"))
                else:
                    out[_norm(key)] = (int(ident), None)
    return out


def add_fqdn_elements(elements: Iterable[tuple[str, int, int]], table: str = TABLE) -> None:
    """Add or refresh DNS-learned IPs: [(ip, identity, timeout seconds; 0 = none)] in one transaction,
    into both FQDN maps.

    Re-adding an IP with the same identity refreshes its timeout. An IP whose identity changed
    (the kernel refuses to overwrite a map value) is deleted and re-added in the same transaction.
    """
    elements = list(elements)
    if not elements:
        return
    command = dp_compile.fqdn_add_command(elements, table)
    try:
        run(command)
        return
    except NftError as err:
        if "File exists" not in err.message:
            raise
    deletes = ""
    for name in dp_compile.FQDN_MAPS:
        current = fqdn_elements(table, name)
        changed = [ip for ip, ident, _ in elements
                   if current.get(_norm(ip), (ident,))[0] != ident]
        deletes += dp_compile.fqdn_delete_command(changed, table, maps=[name])
    run(deletes + command)


def delete_fqdn_elements(ips: Iterable[str], table: str = TABLE) -> None:
    """Forget DNS-learned IPs now, from both maps (those already expired are skipped)."""
    ips = list(ips)
    deletes = ""
    for name in dp_compile.FQDN_MAPS:
        current = fqdn_elements(table, name)
        present = [ip for ip in ips if _norm(ip) in current]
        deletes += dp_compile.fqdn_delete_command(present, table, maps=[name])
    if deletes:
        run(deletes)
