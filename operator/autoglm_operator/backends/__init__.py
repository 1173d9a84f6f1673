"""Backends that carry out the reconcile core's actions: local ones for ``autoglm run`` (processes
on this machine), Kubernetes ones for the operator (Argo Workflows, KServe)."""
