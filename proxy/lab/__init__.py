"""The namespace lab: Kubernetes-like workloads as Linux network namespaces, each with its sidecar.

`l7gate lab up -f FILE` builds a lab from a compose-like YAML file; `l7gate lab exec SERVICE --
CMD` runs a command inside a workload; `l7gate lab status` shows what is up; `l7gate lab down
[NAME]` removes exactly what `up` created. The demos drive it through `start()` and `Lab`.

Lab file (all keys but `services` optional; see lab/README.md and lab/*.yaml)::

    name: starwars                 # lab name (default: the file's stem); namespaces are
                                   #   l7lab-<name>-<workload>, state in /run/l7gate/lab/<name>/
    subnet: 10.77.0.0/24           # addresses given out automatically (default 10.77.0.0/24)
    policies: ../policies/x/       # directory copied into the lab's policies dir (default: empty)
    services:
      deathstar:                   # a Deployment-like service: replicas deathstar-1, deathstar-2
        labels: {org: empire, class: deathstar}
        namespace: default         # the Kubernetes namespace (default: default)
        serviceAccount: default    # (default: default)
        replicas: 2                # (default 1; one replica is named like the service)
        ips: [10.77.0.11, 10.77.0.12]   # optional fixed addresses, one per replica (or ip: X)
        app: deathstar             # a built-in app (deathstar, echo-http, tcp-echo, idle) + args: [...]
        # command: [python, -m, proxy.lab.apps.echo_http, --port, "8080"]
        #                          # or any argv (a string is split like a shell; a list of argvs
        #                          # runs several processes); `python` = l7gate's interpreter.
        #                          # Neither app nor command: idle.
        ports: [80]                # waited for before up returns; {name: port} entries are
                                   #   named ports (namedPorts); "53/UDP" and {port, protocol, name}
        enforce: true              # start a sidecar (`l7gate run`) for it (default true)
        selector: {class: deathstar}   # the Service's pod selector (default: labels)
    dns:                           # the lab's DNS server, itself an endpoint (kube-dns)
      name: kube-dns               # defaults: kube-dns, namespace kube-system, labels
      namespace: kube-system       #   {k8s-app: kube-dns}, serviceAccount coredns, enforce false
      ip: 10.77.0.53               # (default: .53 of the subnet)
      domain: cluster.local
      ttl: 30                      # default TTL of every answer
      options: [ndots:5]           # resolv.conf options line
      records:                     # static records, beside the automatic ones
        db.example: 10.77.0.99
        www.example: {cname: db.example, ttl: 5}
    external:                      # simulated Internet hosts: HTTP on 80 and 443 (plain HTTP)
      api.github.com: {ip: 192.0.2.10, ports: [80, 443], aliases: [], ttl: 30}
      cilium.io: {}                # or a plain list of host names

Automatic DNS records: `<svc>` and `<svc>.<namespace>.svc.<domain>` -> every replica's address;
the DNS server's own names likewise; each external host and alias -> its address. Workload namespaces get a
kubelet-style resolv.conf (nameserver = the lab DNS server, search `<ns>.svc.<domain>
svc.<domain> <domain>`) through `ip netns exec`'s /etc/netns/<netns>/resolv.conf.

Workloads without a sidecar (enforce: false, the DNS server by default, everything under
--no-agents) are published in the registry by `up`, so the agents know their identities.
Services are written to `<registry>/services/<ns>.<name>.json` ({name, namespace, selector, ips}).

Never: attaches anything to the root network namespace, uses an address no lab namespace owns,
signals a process it did not start, or removes a namespace it did not create.
"""
from __future__ import annotations


def up(file: str, no_agents: bool = False, **kw) -> int:
    from proxy.lab.commands import up as _up
    return _up(file, no_agents, **kw)


def down(name: str | None = None, **kw) -> int:
    from proxy.lab.commands import down as _down
    return _down(name, **kw)


def exec_(service: str, argv: list[str], **kw) -> int:
    from proxy.lab.commands import exec_ as _exec
    return _exec(service, argv, **kw)


def status(**kw) -> int:
    from proxy.lab.commands import status as _status
    return _status(**kw)
