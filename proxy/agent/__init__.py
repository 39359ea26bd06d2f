"""The agent (`l7gate run`): one per workload, in the workload's network namespace.

Wires the engine, the datapath and both proxies for that workload: reads the policies directory
and the shared registry, keeps the nftables table in sync, starts the HTTP and DNS proxies, and
answers `l7gate endpoint list` & co. on a control socket. Never decides policy itself.
"""
