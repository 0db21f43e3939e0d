"""Datamodules, one per data family; each reads the layout its publishers ship."""

from datamodules.derm import DermDataModule

__all__ = ["DermDataModule"]
