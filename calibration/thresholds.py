"""Clipping thresholds (amax) from a histogram of |x|: one function per calibration method that needs one.

Every histogram has bins [k * bin_width, (k + 1) * bin_width) over [0, max|x|]; every threshold lies in
that range, so no method ever clips less than `minmax`.
"""

from __future__ import annotations

import math

import numpy as np

NUM_QUANTIZED_BINS = 128  # symmetric INT8: levels 0..127 on each side of zero


def percentile_threshold(hist: np.ndarray, bin_width: float, percentile: float) -> float:
    """The value below which `percentile` % of the histogram's counts lie (linear inside a bin).

    hist: counts of |x| in bins [k * bin_width, (k + 1) * bin_width).
    """
    cumulative = np.cumsum(hist, dtype=np.int64)
    target = percentile / 100.0 * float(cumulative[-1])
    b = min(int(np.searchsorted(cumulative, target, side="left")), len(hist) - 1)
    below = float(cumulative[b - 1]) if b > 0 else 0.0
    fraction = (target - below) / float(hist[b]) if hist[b] else 1.0
    return float((b + min(max(fraction, 0.0), 1.0)) * bin_width)


def entropy_threshold(hist: np.ndarray, bin_width: float, num_quantized_bins: int = NUM_QUANTIZED_BINS) -> float:
    """TensorRT-style entropy calibration of a histogram of |x| (see the module docstring).

    Returns amax = i * bin_width for the number of bins i (num_quantized_bins..len(hist)) whose
    clipped distribution loses the least information when quantized to `num_quantized_bins` levels.
    """
    hist = np.array(hist, np.float64)
    if len(hist) < num_quantized_bins:
        raise ValueError(f"the histogram needs at least {num_quantized_bins} bins, it has {len(hist)}")
    if len(hist) > 1:
        hist[0] = hist[1]  # the zero spike (ReLU) would otherwise dominate the divergence
    thresholds, divergences = kl_divergences(hist, num_quantized_bins)
    best = len(divergences) - 1 - int(np.argmin(divergences[::-1]))  # the largest threshold among equals
    return float(thresholds[best] * bin_width)


def kl_divergences(hist: np.ndarray, num_quantized_bins: int = NUM_QUANTIZED_BINS) -> tuple[np.ndarray, np.ndarray]:
    """KL(P||Q) for every candidate threshold i = num_quantized_bins..len(hist) (in bins).

    Returns (thresholds, divergences). Vectorised over all candidates at once through cumulative
    sums: within a group of merged bins Q is constant, so every sum over bins becomes a sum over
    128 groups (1921 candidates x 128 groups instead of 1921 x 2048 bins).
    """
    h = np.asarray(hist, np.float64)
    q = num_quantized_bins
    thresholds = np.arange(q, len(h) + 1)
    total = h.sum()
    if total <= 0:
        return thresholds, np.zeros(len(thresholds))
    cum = np.concatenate(([0.0], np.cumsum(h)))
    cum_nonzero = np.concatenate(([0], np.cumsum(h > 0)))
    cum_hlogh = np.concatenate(([0.0], np.cumsum(_xlogx(h))))

    # Group g of candidate i holds bins ceil(g*i/q) .. ceil((g+1)*i/q) - 1 (bin j is in group floor(j*q/i)).
    g = np.arange(q + 1)
    edges = -((-g[None, :] * thresholds[:, None]) // q)
    group_sum = cum[edges[:, 1:]] - cum[edges[:, :-1]]
    group_nonzero = cum_nonzero[edges[:, 1:]] - cum_nonzero[edges[:, :-1]]
    kept = cum[thresholds]  # counts below the threshold: Q is made of these

    # KL of P' = h[:i] / total against Q (q_j = group_sum / (group_nonzero * kept) on non-empty bins):
    # sum_j h_j/total * log(h_j * group_nonzero * kept / (total * group_sum)).
    with np.errstate(divide="ignore", invalid="ignore"):
        log_group_nonzero = np.where(group_nonzero > 0, np.log(np.maximum(group_nonzero, 1)), 0.0)
        grouped = (_xlogx(group_sum) - group_sum * log_group_nonzero).sum(axis=1)
        divergences = (cum_hlogh[thresholds] - grouped + _xlogx(kept) - kept * math.log(total)) / total

        # P differs from P' in its last bin only: the outliers h[i:] are added there.
        last = h[thresholds - 1]
        outliers = total - kept
        q_last = np.where(last > 0, group_sum[:, -1] / np.maximum(group_nonzero[:, -1], 1) / kept, 0.0)
        p_last, p_last_clipped = (last + outliers) / total, last / total
        old_term = np.where(last > 0, p_last_clipped * np.log(p_last_clipped / q_last), 0.0)
        new_term = np.where(p_last > 0, p_last * np.log(p_last / q_last), 0.0)  # inf where q_last == 0
    divergences = divergences - old_term + new_term
    return thresholds, divergences


def mse_threshold(hist: np.ndarray, bin_width: float, num_quantized_bins: int = NUM_QUANTIZED_BINS) -> float:
    """The threshold i * bin_width (i = num_quantized_bins..len(hist)) of least expected squared error.

    With step d = amax / 127, a value inside the range is off by its rounding error, d^2 / 12 on
    average; a value x above it by its clipping error (x - amax)^2, x taken at its bin's centre. Bin 0
    counts no rounding error: after a ReLU it holds exact zeros, which quantize exactly (as in the
    entropy method, the zero spike would otherwise pull the threshold down). Vectorised over all
    candidates with cumulative sums of the tail's moments.
    """
    h = np.asarray(hist, np.float64)
    if len(h) < num_quantized_bins:
        raise ValueError(f"the histogram needs at least {num_quantized_bins} bins, it has {len(h)}")
    thresholds = np.arange(num_quantized_bins, len(h) + 1)
    amax = thresholds * bin_width
    step = amax / (num_quantized_bins - 1)
    centres = (np.arange(len(h)) + 0.5) * bin_width
    # Sums over the tail, bins i.. (index len(h): the empty tail): counts, sum of x, sum of x^2.
    count, first, second = (np.concatenate((np.cumsum((h * centres ** p)[::-1])[::-1], [0.0])) for p in (0, 1, 2))
    inside = np.concatenate(([0.0], np.cumsum(h[1:])))[thresholds - 1]  # bins 1 .. i-1
    rounding = inside * step ** 2 / 12
    clipping = second[thresholds] - 2 * amax * first[thresholds] + amax ** 2 * count[thresholds]
    best = int(np.argmin(rounding + clipping))
    return float(amax[best])


def _xlogx(v):
    """v * log(v) with 0 * log 0 = 0 (v >= 0)."""
    v = np.asarray(v, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(v > 0, v * np.log(np.where(v > 0, v, 1.0)), 0.0)
