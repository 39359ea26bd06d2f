"""The HTTP/1.1 fast path: a transparent proxy that checks every request against the policy.

What it does
  `conn` is the protocol, sans-IO (h11-style): `RequestReader` turns client bytes into typed
  events (head, body, end, protocol error with the status to answer), `ResponseReader` finds
  where each upstream response ends, and `ProxyConnection` ties them to the verdicts: every
  request of a keep-alive or pipelined connection is checked in order, allowed requests are
  forwarded byte for byte (only a canonicalised request-target or stripped `Upgrade: h2c`
  headers are rewritten), denied ones get Cilium's exact 403 in their turn, and WebSocket
  upgrades / CONNECT become an opaque tunnel only once allowed and accepted upstream.
  `server` moves the bytes: asyncio (uvloop in production), original destination from
  SO_ORIGINAL_DST, upstream sockets marked with PROXY_MARK so nftables lets them through.

What it never does
  It never forwards a byte it has not parsed, never matches rules itself (the oracle does,
  through `proxy.policy.httpmatch`), never touches nftables, never speaks HTTP/2 or TLS (h2
  prior knowledge is refused; `Upgrade: h2c` is stripped), never logs per request.

Metrics
  `Server.stats`: connections, requests, forwarded, denied, errors (protocol errors answered
  400/431/502/503 or connections refused), tunnels. One `on_flow(event)` per request: an
  `HTTPEvent`, a read-only mapping built only when read.
"""
