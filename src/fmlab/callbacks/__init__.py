"""Thin Lightning hooks: EMA, periodic evaluation (calls `fmlab.evaluation`), sample pictures, resume guards. They
never compute a loss; `fmlab.build` chooses which ones a run gets."""

from __future__ import annotations

from fmlab.callbacks.ema import EMA, sampling_net
from fmlab.callbacks.evaluator import PeriodicEvaluation
from fmlab.callbacks.sample_logger import SampleLogger

__all__ = ["EMA", "PeriodicEvaluation", "SampleLogger", "sampling_net"]
