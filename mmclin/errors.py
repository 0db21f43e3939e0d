"""Errors that name the file, row or record at fault."""

from __future__ import annotations


class DataError(ValueError):
    """Input data does not match what the reader expects; the message names the file/row and the problem."""
