"""Prefect flows over whole datasets."""
