"""The datapath: nftables in the workload's network namespace, compiled from the PolicyMap.

Compiles mapstate entries and the ipcache into one table of our own, replaced atomically; keeps
L3/L4-only allows in the kernel; redirects ports with L7 rules to the proxies. Never decides
policy itself: it only renders what `proxy.policy.mapstate` says.
"""
