"""The one exception of the data pipeline: a problem with the data on disk, naming the path."""
from __future__ import annotations


class DataError(ValueError):
    """Bad or missing data. The message names every offending path (and why), so it can be fixed in one go."""
