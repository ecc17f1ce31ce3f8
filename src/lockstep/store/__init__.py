"""The dump store: an append-only, language-agnostic directory of tensors (docs/format.md)."""

from .dtypes import DTYPES, to_float
from .reader import Dump, Record, open_dump
from .stats import STAT_FIELDS, array_stats
from .writer import DATA_FILE, FORMAT_VERSION, INDEX_FILE, DumpWriter

__all__ = ["DTYPES", "to_float", "Dump", "Record", "open_dump", "STAT_FIELDS", "array_stats",
           "DATA_FILE", "FORMAT_VERSION", "INDEX_FILE", "DumpWriter"]
