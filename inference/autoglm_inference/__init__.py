"""Serving causal LMs. So far: the energy meter; the KServe model server is tracked by the inference issue."""
