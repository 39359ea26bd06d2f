"""The datapath: nftables in the workload's network namespace, compiled from the PolicyMap.

Compiles mapstate entries and the ipcache into one table of our own, replaced atomically; keeps
L3/L4-only allows in the kernel; redirects ports with L7 rules to the proxies. Never decides
policy itself: it only renders what `proxy.policy.mapstate` says.

Modules (pure first, I/O last):
  state     DatapathState: the plain value one workload's table is made of
  ipcache   nested prefixes -> disjoint intervals, longest prefix wins (pure)
  compile   DatapathState -> `nft -f` script; closed_table(); FQDN element commands (pure)
  nft       libnftables through ctypes: apply, check, list_table, delete_table,
            add_fqdn_elements / delete_fqdn_elements / fqdn_elements (in-process, one transaction)
  routing   the policy-routing rules TPROXY for local DNS and silent egress drops need (`ip`)
  origdst   original destination of redirected traffic (SO_ORIGINAL_DST, IP_RECVORIGDSTADDR)
            and the transparent sockets the DNS proxy needs

Never does: flush or touch any table but `inet l7gate`, send packets, or run the `nft` binary.
Exports no metrics itself; every policy drop goes to NFLOG group `constants.NFLOG_GROUP` with
prefix `l7gate:<ingress|egress>:<POLICY_DENIED|POLICY_DENY>` and the peer identity as the
packet mark (rate-limited to 100/s, burst 200), for the flows to turn into Hubble records.
"""
