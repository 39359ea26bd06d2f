"""`l7gate demo NAME [--keep] [--list]`: the seed tutorials replayed in the namespace lab.

Each demo (starwars, dns, namespaces, sockshop) builds its lab with sidecars (`lab/<name>.yaml`,
lab name = the demo's name), applies the tutorial's policy files from `policies/` one step at a
time, sends the tutorial's requests from inside the workloads with the lab's client, and prints
per step the command, the tutorial's outcome, the actual one and ✔/✘; then
`N/M steps as the tutorial says`. Exit 0 when all match, 1 otherwise, 2 for a usage problem
(unknown demo, no privileges), 130 when interrupted. The lab is removed at the end, on Ctrl-C
and on errors, unless `--keep` (after the last step). `--compose` replays a demo on its
docker-compose stack instead (`proxy.docker.demo`, with this package's `Replay`).

    from proxy.lab.demo import run, names
    run("starwars", keep=False, out=sys.stdout)   # -> exit code
"""
from __future__ import annotations

from proxy.lab.demo.runner import list_demos, names, run
from proxy.lab.demo.scenarios import DEMOS

__all__ = ["DEMOS", "list_demos", "names", "run"]
