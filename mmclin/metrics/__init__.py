"""Metric helpers shared by the evaluation tasks."""

from mmclin.metrics.bootstrap import bootstrap_ci

__all__ = ["bootstrap_ci"]
