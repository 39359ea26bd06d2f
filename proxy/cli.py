"""`l7gate` command line: argument parsing only; each command calls one function of a package.

Exit codes and output shapes are a contract with scripts outside the project (issue text and
`../shared/checks/cli-contract`): keep them exact.
"""
from __future__ import annotations

import argparse
import sys


def _policy_validate(args: argparse.Namespace) -> int:
    from proxy.policy import validate
    from proxy.policy.sanitize import AgentOptions
    options = AgentOptions(enable_node_selector_labels=args.enable_node_selector_labels,
                           enable_extended_ip_protocols=args.enable_extended_ip_protocols)
    return validate.run(args.paths, args.output, sys.stdout, options)


def _trace(args: argparse.Namespace) -> int:
    from proxy.policy import trace
    return trace.run(args, sys.stdout)


def _fqdn_match(args: argparse.Namespace) -> int:
    from proxy.fqdn import matchpattern
    return matchpattern.run_match(args.pattern, args.names, sys.stdout)


def _run(args: argparse.Namespace) -> int:
    from proxy.agent import run
    return run.run(args)


def _observe(args: argparse.Namespace) -> int:
    from proxy.observe import relay
    return relay.run(args, sys.stdout)


def _control(cmd: str):
    def call(args: argparse.Namespace) -> int:
        from proxy.agent import control
        return control.run(cmd, args.registry, args.output, sys.stdout)
    return call


def _lab(args: argparse.Namespace) -> int:
    from proxy import lab
    if args.lab_command == "up":
        return lab.up(args.file, no_agents=args.no_agents)
    if args.lab_command == "down":
        return lab.down(args.name)
    if args.lab_command == "exec":
        argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
        return lab.exec_(args.service, argv)
    return lab.status()


def _demo(args: argparse.Namespace) -> int:
    from proxy.lab import demo
    if args.list:
        return demo.list_demos(sys.stdout)
    if not args.name:
        print("l7gate demo: name a demo (" + ", ".join(demo.names()) + ") or use --list",
              file=sys.stderr)
        return 2
    if args.compose:
        from proxy.docker import demo as compose_demo
        return compose_demo.run(args.name, keep=args.keep, out=sys.stdout)
    return demo.run(args.name, keep=args.keep, out=sys.stdout)


def _compose_inject(args: argparse.Namespace) -> int:
    from proxy.docker import inject
    services = [x for x in (args.services or "").split(",") if x] or None
    return inject.inject_command(args.file, args.policies, services, args.output, sys.stdout)


def _compose_build(args: argparse.Namespace) -> int:
    from proxy.docker import images
    return images.build_command(args.base, sys.stdout)


def _add_control(sub, words: str, help_text: str) -> None:
    import os
    from proxy.agent.control import DEFAULT_REGISTRY
    c = sub.add_parser(words.split()[-1], help=help_text)
    c.add_argument("--registry", default=os.environ.get("L7GATE_REGISTRY", DEFAULT_REGISTRY),
                   help="registry directory shared by the agents (env L7GATE_REGISTRY)")
    c.add_argument("-o", "--output", choices=["text", "json"], default="text")
    c.set_defaults(func=_control(words))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="l7gate", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    policy = sub.add_parser("policy", help="policy files: validate")
    psub = policy.add_subparsers(dest="policy_command", required=True, metavar="SUBCOMMAND")
    v = psub.add_parser("validate", help="validate policy files or directories (exit 1 if any is invalid)")
    v.add_argument("paths", nargs="+", metavar="PATH")
    v.add_argument("-o", "--output", choices=["text", "json"], default="text")
    v.add_argument("--enable-node-selector-labels", action="store_true",
                   help="Cilium agent flag: allow fromNodes/toNodes")
    v.add_argument("--enable-extended-ip-protocols", action="store_true",
                   help="Cilium agent flag: allow VRRP/IGMP and empty ports")
    v.set_defaults(func=_policy_validate)
    _add_control(psub, "policy get", "the policies in force in each agent, and rejected files")

    t = sub.add_parser("trace", help="explain the verdict for one flow (exit 0 allowed, 2 denied)")
    t.add_argument("--policies", nargs="+", required=True, metavar="PATH")
    t.add_argument("--endpoints", metavar="FILE", help="YAML list of endpoints (and services)")
    t.add_argument("--from", dest="src", required=True, metavar="SRC",
                   help="endpoint name, inline labels k=v,..., entity:NAME or ip:ADDR")
    t.add_argument("--to", dest="dst", required=True, metavar="DST", help="same forms as --from")
    t.add_argument("--dport", required=True, metavar="PORT[/PROTO]",
                   help="destination port (or ICMP type) and protocol (TCP default; UDP, SCTP, ICMP, ICMPv6)")
    t.add_argument("--http-method", metavar="M")
    t.add_argument("--http-path", metavar="P")
    t.add_argument("--http-host", metavar="H")
    t.add_argument("--http-header", action="append", default=[], metavar="K=V")
    t.add_argument("--dns-name", metavar="NAME")
    t.add_argument("--fqdn-cache", action="append", default=[], metavar="NAME=IP[,IP]...")
    t.add_argument("--policy-enforcement", choices=["default", "always", "never"], default="default",
                   help="Cilium's --enable-policy mode (default: per endpoint and direction)")
    t.add_argument("-o", "--output", choices=["text", "json"], default="text")
    t.set_defaults(func=_trace)

    fqdn = sub.add_parser("fqdn", help="FQDN patterns")
    fsub = fqdn.add_subparsers(dest="fqdn_command", required=True, metavar="SUBCOMMAND")
    m = fsub.add_parser("match", help="match names against a matchPattern/matchName (exit 1 if one misses)")
    m.add_argument("pattern", metavar="PATTERN")
    m.add_argument("names", nargs="+", metavar="NAME")
    m.set_defaults(func=_fqdn_match)
    cache = fsub.add_parser("cache", help="the FQDN cache of the agents")
    csub = cache.add_subparsers(dest="cache_command", required=True, metavar="SUBCOMMAND")
    _add_control(csub, "fqdn cache list", "names learned from DNS answers, with TTLs and IPs")

    r = sub.add_parser("run", help="the sidecar agent for one workload (foreground)")
    r.add_argument("--policies", required=True, metavar="DIR", help="policies directory (watched)")
    r.add_argument("--registry", required=True, metavar="DIR", help="registry shared by all sidecars")
    r.add_argument("--name", required=True, help="this workload's endpoint name")
    r.add_argument("--labels", default="", metavar="k=v,...", help="endpoint labels ([source:]key=value)")
    r.add_argument("--namespace", default="default", help="endpoint namespace (default: default)")
    r.add_argument("--service-account", default="default")
    r.add_argument("--policy-enforcement", choices=["default", "always", "never"], default="default")
    from proxy.agent.control import DEFAULT_REGISTRY
    from proxy.observe import relay
    relay.add_agent_arguments(r)
    r.set_defaults(func=_run)

    o = sub.add_parser("observe", help="flows from every agent, printed as hubble observe does")
    relay.add_parser_arguments(o, default_registry=DEFAULT_REGISTRY)
    o.set_defaults(func=_observe)

    ep = sub.add_parser("endpoint", help="endpoints managed by the agents")
    esub = ep.add_subparsers(dest="endpoint_command", required=True, metavar="SUBCOMMAND")
    _add_control(esub, "endpoint list", "endpoints with enforcement, identity, labels and IPs")
    ident = sub.add_parser("identity", help="security identities")
    isub = ident.add_subparsers(dest="identity_command", required=True, metavar="SUBCOMMAND")
    _add_control(isub, "identity list", "identities and their labels")

    lab = sub.add_parser("lab", help="the namespace lab")
    lsub = lab.add_subparsers(dest="lab_command", required=True, metavar="SUBCOMMAND")
    lu = lsub.add_parser("up", help="build a lab from a lab file")
    lu.add_argument("-f", "--file", required=True)
    lu.add_argument("--no-agents", action="store_true", help="no sidecars (no enforcement)")
    ld = lsub.add_parser("down", help="remove a lab (all labs if no name)")
    ld.add_argument("name", nargs="?")
    le = lsub.add_parser("exec", help="run a command inside a lab workload")
    le.add_argument("service")
    le.add_argument("argv", nargs=argparse.REMAINDER)
    lsub.add_parser("status", help="labs that are up")
    lab.set_defaults(func=_lab)

    comp = sub.add_parser("compose", help="docker-compose: enforce a compose file, build the sidecar image")
    csub2 = comp.add_subparsers(dest="compose_command", required=True, metavar="SUBCOMMAND")
    ci = csub2.add_parser("inject", help="write a compose file where every service has a sidecar")
    ci.add_argument("-f", "--file", action="append", default=[], metavar="FILE",
                    help="the compose file (default: compose.yaml / docker-compose.yml here); repeat it to "
                         "merge several, as compose does (merged by docker-compose config)")
    ci.add_argument("--policies", metavar="DIR", help="policies directory (default ./policies)")
    ci.add_argument("--services", metavar="a,b", help="only these services (default: all)")
    ci.add_argument("-o", "--output", metavar="FILE", help="write here (default: stdout)")
    ci.set_defaults(func=_compose_inject)
    cb = csub2.add_parser("build",
                          help="build the sidecar image l7gate-sidecar:latest (offline base by default)")
    cb.add_argument("--base", metavar="IMAGE",
                    help="base image, e.g. python:3.11-slim (default: a Debian bookworm base made "
                         "locally with debootstrap, l7gate-base:<hash>)")
    cb.set_defaults(func=_compose_build)

    d = sub.add_parser("demo", help="replay a tutorial in the lab: starwars, dns, namespaces, sockshop")
    d.add_argument("name", nargs="?", help="the demo to run")
    d.add_argument("--list", action="store_true", help="list the demos")
    d.add_argument("--keep", action="store_true", help="leave the lab (or stack) up after the last step")
    d.add_argument("--compose", action="store_true",
                   help="run it as a docker-compose stack (starwars; builds the images if needed)")
    d.set_defaults(func=_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except BrokenPipeError:
        return 1


if __name__ == "__main__":
    sys.exit(main())
