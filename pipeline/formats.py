"""One representation of each metric everywhere: the report (tables, headline, captions), the console's
drift lines and table, and the drift check's failure reasons.

- agreement (a fraction 0..1) and top-1 / top-5 (percent): a percentage with one decimal, "99.2%";
- a top-1 drop: percentage points with one decimal, "1.2 points";
- max abs difference (logit units) and its ratio to max |ref|: three significant digits in plain
  notation ("1.72", "0.102"), the ratio always named "relative max abs diff";
- cosine: six decimals; SQNR: one decimal and "dB" ("∞ dB" when identical).

A figure set against its budget (`versus`) gets more decimals only where the usual ones would print
both alike ("98.96% < 99.00%" rather than "99.0% < 99.0%").
"""

from __future__ import annotations

import math


def _finite(value) -> float | None:
    """A float, or None for None / "inf" / "nan" strings and non-finite floats."""
    if value is None or isinstance(value, str):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def pct(fraction, decimals: int = 1) -> str:
    """An agreement fraction 0..1 as "99.2%"."""
    number = _finite(fraction)
    return "—" if number is None else f"{100.0 * number:.{decimals}f}%"


def percent(value, decimals: int = 1) -> str:
    """A value already in percent (top-1, top-5) as "76.3%"."""
    number = _finite(value)
    return "—" if number is None else f"{number:.{decimals}f}%"


def percent_change(reference, value) -> str:
    return "—" if _finite(value) is None else f"{percent(reference)} → {percent(value)}"


def points(value, decimals: int = 1) -> str:
    number = _finite(value)
    return "—" if number is None else f"{number:.{decimals}f} points"


def abs_diff(value, decimals: int = 3) -> str:
    """A max abs difference or its ratio: three significant digits (`decimals`), never exponent notation."""
    number = _finite(value)
    if number is None:
        return "—" if value is None else str(value)
    if number == 0:
        return "0"
    digits = max(0, decimals - 1 - math.floor(math.log10(abs(number))))
    return f"{number:.{digits}f}"


def cosine(value, decimals: int = 6) -> str:
    number = _finite(value)
    return "—" if number is None else f"{number:.{decimals}f}"


def sqnr(value, decimals: int = 1) -> str:
    if value == "inf" or (isinstance(value, float) and value == math.inf):
        return "∞ dB"
    number = _finite(value)
    return "—" if number is None else f"{number:.{decimals}f} dB"


def versus(render, value, threshold, relation: str) -> str:
    """`value relation threshold` in `render`'s representation, with up to three more decimals than usual
    where the usual ones would print two different numbers alike."""
    default = render.__defaults__[0]
    for decimals in range(default, default + 4):
        left, right = render(value, decimals), render(threshold, decimals)
        if left != right:
            break
    return f"{left} {relation} {right}"
