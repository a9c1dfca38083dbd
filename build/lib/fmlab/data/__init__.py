"""LightningDataModules: each yields (x0, x1) batches of source and data samples, and declares what evaluation reads
(`EvaluationData`)."""

from fmlab.data.interface import EvaluationData

__all__ = ["EvaluationData"]
