"""Observability: the server's figures (stats) and their Prometheus export (metrics)."""
