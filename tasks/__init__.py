"""Prefect tasks: resolve inputs, call one eqdiff function, store, return keys."""
