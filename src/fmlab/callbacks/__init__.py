"""Callbacks own sampling and evaluation; they never compute a loss."""

from fmlab.callbacks.ema import EMA, sampling_net
from fmlab.callbacks.evaluator import Evaluator
from fmlab.callbacks.sample_logger import SampleLogger

__all__ = ["EMA", "Evaluator", "SampleLogger", "sampling_net"]
