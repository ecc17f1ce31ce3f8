"""lockstep: run an inference engine beside a trusted reference and find where they part."""

from ._version import __version__
from .capture import Recorder, probe, record
from .checkpoint.weights import LoadCheck, check_loaded
from .compare import Comparison, Tolerances, compare
from .errors import DumpError, LockstepError
from .store import Dump, open_dump

__all__ = ["__version__", "record", "probe", "Recorder", "open_dump", "Dump", "compare",
           "Comparison", "Tolerances", "LockstepError", "DumpError", "check_loaded",
           "LoadCheck"]
