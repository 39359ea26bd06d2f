"""Docker / docker-compose integration for l7gate (issue 8).

- `inject`: rewrites a user's compose file (a parsed dict, pure transform) so that every selected
  service gets an `l7gate run` sidecar that owns its network namespace (`network_mode:
  service:<svc>-l7gate` on the app, healthcheck-gated start); `inject_command` is the body of
  `l7gate compose inject`. It never talks to Docker and never writes the input file.
- `images`: `l7gate compose build`, the sidecar image from local inputs (a debootstrap base or a
  given one, wheels prepared on the host), each step skipped when its inputs did not change.
- `demo`: `l7gate demo starwars --compose`, the lab demo's replay on compose/starwars/ (brought up
  and taken down with docker-compose, checks run with `docker exec`).

Never does: remove images other than the `l7gate-sidecar` image a rebuild replaced (when no
container uses it), or containers, networks and volumes of a compose project it did not bring up
itself; edit services it cannot enforce (`network_mode: host|none|service:X|container:X`,
reported and left as they were).
"""
