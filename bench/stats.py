"""Order statistics for the figures, without numpy."""

from __future__ import annotations

import math
from collections.abc import Sequence

TIMES = "\N{MULTIPLICATION SIGN}"


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation between closest ranks; NaN when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def median(values: Sequence[float]) -> float:
    """The 50th percentile."""
    return percentile(values, 50)


def ms(seconds: float) -> str:
    """Seconds as a short millisecond figure for the table."""
    if math.isnan(seconds):
        return "n/a"
    value = seconds * 1000.0
    if value >= 100:
        return f"{value:.0f} ms"
    return f"{value:.1f} ms" if value >= 1 else f"{value:.2f} ms"


def ratio(numerator: float, denominator: float) -> str:
    """How many times larger the numerator is, as the table prints it."""
    if math.isnan(numerator) or math.isnan(denominator) or denominator <= 0:
        return "n/a"
    value = numerator / denominator
    return f"{value:.0f}{TIMES}" if value >= 10 else f"{value:.1f}{TIMES}"
