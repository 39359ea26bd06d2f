"""What the integration tiers need from the machine, said once."""
import ctypes
import os
import shutil


def nft_unusable_reason() -> str | None:
    """Why real namespaces + nftables cannot be used here, or None when they can."""
    if os.geteuid() != 0:
        return "needs root"
    if not shutil.which("ip") or not shutil.which("nft"):
        return "needs iproute2 and nftables"
    try:
        ctypes.CDLL("libnftables.so.1")
    except OSError:
        return "needs libnftables.so.1"
    return None
