"""The lab fixtures of tests/test_qtfs.py (a work directory, a DPU agent), shared by import."""

from tests.test_qtfs import agent, work

__all__ = ["agent", "work"]
