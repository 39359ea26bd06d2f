"""L7 proxies: the HTTP fast path (uvloop + httptools) and the DNS proxy (dnslib).

They move bytes and ask `oracle.PolicyOracle` for verdicts; the rule matchers they use are the
engine's (`proxy.policy.httpmatch`, `proxy.fqdn.matchpattern`), shared with `trace`.
They never touch nftables themselves: learned DNS answers go to the oracle, which opens the IPs.
"""
