"""Docker / docker-compose integration for l7gate (issue 8).

What it does: `proxy.docker.inject` rewrites a user's compose file (a parsed dict, pure transform)
so that every selected service gets an `l7gate run` sidecar that owns its network namespace
(`network_mode: service:<svc>-l7gate` on the app, healthcheck-gated start), and
`inject_command` is the body of `l7gate compose inject`.

What it never does: talk to a Docker engine, pull or build images, run containers, or write the
user's input file in place (output goes to `-o FILE` or stdout). It never edits services it cannot
enforce (`network_mode: host|none|service:X|container:X`): those are reported and left as they were.
"""
