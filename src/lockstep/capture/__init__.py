"""Capture: hooks, probes and traces that feed one dump through the writer thread."""

from .recorder import Recorder, active, probe, record
from .surface import RecorderSurface, Step
from .tracing import TraceInfo

__all__ = ["Recorder", "active", "probe", "record", "TraceInfo", "Step", "RecorderSurface"]
