"""`l7gate` command line: argument parsing only; each command calls one function of a package.

Exit codes and output shapes are a contract with scripts outside the project (issue text and
`../shared/checks/cli-contract`): keep them exact.
"""
from __future__ import annotations

import argparse
import sys


def _policy_validate(args: argparse.Namespace) -> int:
    from proxy.policy import validate
    return validate.run(args.paths, args.output, sys.stdout)


def _trace(args: argparse.Namespace) -> int:
    from proxy.policy import trace
    return trace.run(args, sys.stdout)


def _fqdn_match(args: argparse.Namespace) -> int:
    from proxy.fqdn import matchpattern
    return matchpattern.run_match(args.pattern, args.names, sys.stdout)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="l7gate", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    policy = sub.add_parser("policy", help="policy files: validate")
    psub = policy.add_subparsers(dest="policy_command", required=True, metavar="SUBCOMMAND")
    v = psub.add_parser("validate", help="validate policy files or directories (exit 1 if any is invalid)")
    v.add_argument("paths", nargs="+", metavar="PATH")
    v.add_argument("-o", "--output", choices=["text", "json"], default="text")
    v.set_defaults(func=_policy_validate)

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
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except BrokenPipeError:
        return 1


if __name__ == "__main__":
    sys.exit(main())
