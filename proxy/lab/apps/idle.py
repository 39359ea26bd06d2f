"""Sleep until SIGTERM/SIGINT: the process of a client-only workload (tiefighter, xwing)."""
from __future__ import annotations

import signal
import sys


def main() -> int:
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: sys.exit(0))
    while True:
        signal.pause()


if __name__ == "__main__":
    raise SystemExit(main())
