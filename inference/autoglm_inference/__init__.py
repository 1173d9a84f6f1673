"""KServe model server for causal LMs with dynamic batching and atomic hot-swap.

Not built yet (tracked by the inference issue): this package holds no server code so far.
"""
