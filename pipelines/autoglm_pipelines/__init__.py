"""Compression, calibration and validation pipeline steps, and their Argo/local runners.

Not built yet (tracked by the pipelines issue): this package holds no step code so far.
"""
