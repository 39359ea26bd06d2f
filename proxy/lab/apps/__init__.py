"""Built-in lab apps: tiny stand-ins for the tutorials' container images, run as `python -m`.

- `deathstar`  Cilium's Star Wars deathstar (HTTP on :80): POST /v1/request-landing, PUT
               /v1/exhaust-port, GET /v1/ (JSON), GET /v1/healthz.
- `echo_http`  HTTP on the given ports, any method and path: answers `<name> <METHOD> <path>
               host=<Host>`; the simulated external hosts and metrics endpoints.
- `tcp_echo`   TCP echo (default :27017), the MongoDB stand-in of the sock-shop demo.
- `idle`       sleeps; for client-only workloads (tiefighter, xwing, mediabot).
- `dnsserver`  the lab's DNS server (dnslib, UDP and TCP), answering from the lab's zone file.
- `client`     a small HTTP/TCP client for demos and tests when curl is missing; prints the body,
               or TIMEOUT / REFUSED / RESET / UNREACHABLE / UNRESOLVED / EMPTY.

Each starts in well under a second (stdlib asyncio, uvloop when installed), and exits on SIGTERM
or SIGINT. They never open connections of their own, except the client.
"""
