"""The feature-distillation baselines DS2D2 is compared with, run in the same harness: FitNet, PKD and FGD.

Each takes the student's FPN maps (already mapped to the teacher's width by the adapter where the widths differ) and
the teacher's, and returns its loss term(s) for the levels it distils; the task (distill.tasks) applies the weights.
"""
from distill.kd.fgd import FGDLoss
from distill.kd.fitnet import fitnet_loss
from distill.kd.pkd import pkd_loss

__all__ = ["FGDLoss", "fitnet_loss", "pkd_loss"]
