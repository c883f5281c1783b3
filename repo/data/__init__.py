"""Preference data: records and validation, loaders, label tables, simulation."""

from repo.data.errors import DataError

__all__ = ["DataError"]
