"""Feedback ingestion, prompt optimization and retraining triggers.

Not built yet: this package holds no feedback code so far.
"""
