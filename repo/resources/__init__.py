"""Data files shipped with re-po (read through :mod:`importlib.resources`)."""
