"""l7gate: Cilium network policies enforced on containers outside Kubernetes."""
__version__ = "0.1.0"
