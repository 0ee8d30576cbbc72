"""Comparison helpers shared by the tests (free of torch, so the Python 3.12 run imports them)."""

import numpy as np


def relative_error(actual, reference) -> float:
    """The largest absolute difference over the largest reference magnitude (float64)."""
    actual, reference = np.asarray(actual, np.float64), np.asarray(reference, np.float64)
    return float(np.max(np.abs(actual - reference)) / np.max(np.abs(reference)))
