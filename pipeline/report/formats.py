"""One representation of each metric, everywhere in the report (tables, headline, captions).

- agreement (a fraction 0..1) and top-1 / top-5 (percent): a percentage with one decimal, "99.2%";
- a top-1 drop: percentage points with one decimal, "1.2 points";
- max abs difference (logit units) and its ratio to max |ref|: three significant digits in plain
  notation ("1.72", "0.102"), the ratio always named "relative max abs diff";
- cosine: six decimals; SQNR: one decimal and "dB" ("∞ dB" when identical).
"""

from __future__ import annotations

import math


def _finite(value) -> float | None:
    """A float, or None for None / "inf" / "nan" strings and non-finite floats."""
    if value is None or isinstance(value, str):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def pct(fraction) -> str:
    """An agreement fraction 0..1 as "99.2%"."""
    number = _finite(fraction)
    return "—" if number is None else f"{100.0 * number:.1f}%"


def percent(value) -> str:
    """A value already in percent (top-1, top-5) as "76.3%"."""
    number = _finite(value)
    return "—" if number is None else f"{number:.1f}%"


def percent_change(reference, value) -> str:
    return "—" if _finite(value) is None else f"{percent(reference)} → {percent(value)}"


def points(value) -> str:
    number = _finite(value)
    return "—" if number is None else f"{number:.1f} points"


def abs_diff(value) -> str:
    """A max abs difference or its ratio: three significant digits, never exponent notation."""
    number = _finite(value)
    if number is None:
        return "—" if value is None else str(value)
    if number == 0:
        return "0"
    digits = max(0, 2 - math.floor(math.log10(abs(number))))
    return f"{number:.{digits}f}"


def cosine(value) -> str:
    number = _finite(value)
    return "—" if number is None else f"{number:.6f}"


def sqnr(value) -> str:
    if value == "inf" or (isinstance(value, float) and value == math.inf):
        return "∞ dB"
    number = _finite(value)
    return "—" if number is None else f"{number:.1f} dB"
