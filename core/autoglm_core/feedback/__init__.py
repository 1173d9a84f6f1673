"""Feedback events and the request log they are joined to: what the server writes and the feedback
loop reads (``records`` is pure; ``store`` is the database gateway)."""
