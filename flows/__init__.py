"""Prefect flows (composition only) and the `metarec` CLI."""
