"""The policy engine: pure Python, no I/O beyond reading the files it is given.

Stages, as in Cilium's pkg/policy: api types (what the YAML says; `api`, loaded and validated by
`load`, `schema`, `sanitize`, `knp`) -> per-endpoint resolved policy (`repository`, `l4`) ->
flattened lookup tables (`mapstate`), which the datapath compiles and `trace` explains.
Never imports the datapath, the proxies or the agent.
"""
