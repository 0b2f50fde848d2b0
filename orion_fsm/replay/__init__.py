"""Replay recorded requests: `replay(record)` drives a fresh request machine with the effects
its trace line recorded (or, live, the real models) and reports the first divergence from it.
"""

from ._compare import Divergence, ReplayMode, ReplayReport, compare
from ._run import replay
from ._step import Step, steps

__all__ = ["Divergence", "ReplayMode", "ReplayReport", "Step", "compare", "replay", "steps"]
