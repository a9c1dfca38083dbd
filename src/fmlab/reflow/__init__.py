"""Reflow (Liu et al. 2023): train a student on its teacher's own pairs (x0, ODE_teacher(x0)). `coupling.py` is the
configuration (`coupling=reflow`), `pairs.py` makes and verifies the stored pairs, `datamodule.py` streams them."""

from fmlab.reflow.coupling import ReflowCoupling
from fmlab.reflow.datamodule import ReflowDataModule, Teacher, init_student

__all__ = ["ReflowCoupling", "ReflowDataModule", "Teacher", "init_student"]
