"""FQDN patterns and the name->IP cache (pure; the DNS proxy feeds the cache, the engine reads it)."""
