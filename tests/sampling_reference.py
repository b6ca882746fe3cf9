"""Float64 reference of sample_logits' final distribution (docs/DESIGN.md, "Kernel contracts", steps 1-6), written
from the contract with numpy, independently of the kernels, plus chi-square helpers.

The reference sorts (the kernels never do) and works in float64 on the same float32 inputs.
Ties in top-k / top-p are kept together, as the contract states (``keep tokens whose prob >=
the k-th largest``; top-p keeps a token when the mass of the tokens strictly more likely than
it is below p).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats


@dataclass
class GroupSpec:
    """One group's settings, as the reference takes them."""

    mode: str = "none"
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    cfg_scale: float = 1.0
    cfg_image_scale: float = 1.0
    cd_alpha: float = 0.1
    cd_k: int = 1


def _log_softmax(x: np.ndarray) -> np.ndarray:
    finite = np.isfinite(x)
    m = x[finite].max()
    lse = m + np.log(np.exp(x[finite] - m).sum())
    return np.where(finite, x - lse, -np.inf)


def combined_logits(rows: list[np.ndarray], spec: GroupSpec,
                    allowed: np.ndarray | None) -> np.ndarray | None:
    """Steps 1-2 in float64: the combined logits l (-inf = excluded), or None for a group the
    op must flag (NaN / +inf input, or no allowed finite token)."""
    rows = [np.asarray(r, dtype=np.float64) for r in rows]
    used = {"none": [0], "cfg": [0, 1], "cdk": [0, 1], "cfg3": [0, 1, 2]}[spec.mode]
    V = rows[0].shape[0]
    allow = np.ones(V, dtype=bool) if allowed is None else np.asarray(allowed, dtype=bool)
    for j in used:
        r = rows[j][allow]
        if np.isnan(r).any() or np.isposinf(r).any():
            return None
    banned = ~allow
    for j in used:
        banned |= np.isneginf(rows[j])
    with np.errstate(invalid="ignore"):
        if spec.mode == "none":
            lg = rows[0].copy()
        elif spec.mode == "cfg":
            c, u = rows[0], rows[1]
            lg = u + spec.cfg_scale * (c - u)
        elif spec.mode == "cfg3":
            c, i, u = rows
            lg = u + spec.cfg_image_scale * (i - u) + spec.cfg_scale * (c - i)
        else:  # cdk
            c, u = rows[0], rows[1]
            cm = np.where(allow, c, -np.inf)
            e = _log_softmax(cm)
            a = _log_softmax(np.where(allow & ~banned, u, -np.inf))
            pe = np.exp(e)
            finite = np.sort(pe[np.isfinite(cm)])[::-1]
            kth = finite[spec.cd_k - 1] if spec.cd_k <= finite.size else 0.0
            keep = pe >= spec.cd_alpha * kth
            lg = np.where(keep, e - a, -np.inf)
    lg = np.where(banned, -np.inf, lg)
    if not np.isfinite(lg).any():
        return None
    return lg


def final_distribution(rows: list[np.ndarray], spec: GroupSpec,
                       allowed: np.ndarray | None = None) -> np.ndarray | None:
    """The exact float64 distribution a group is sampled from (steps 1-5), or a one-hot on
    the argmax for T == 0; None for a flagged group."""
    lg = combined_logits(rows, spec, allowed)
    if lg is None:
        return None
    V = lg.shape[0]
    if spec.temperature == 0.0:
        out = np.zeros(V)
        out[int(np.argmax(lg))] = 1.0  # np.argmax: first (lowest) index on ties
        return out
    z = lg / spec.temperature
    keep = np.isfinite(z)
    if 0 < spec.top_k < keep.sum():
        kth = np.sort(z[keep])[::-1][spec.top_k - 1]
        keep &= z >= kth
    p = np.where(keep, np.exp(z - z[keep].max()), 0.0)
    p /= p.sum()
    if spec.top_p < 1.0:
        desc = np.sort(p)[::-1]
        before = np.cumsum(desc) - desc  # mass strictly before each sorted position
        # a token's "mass strictly above" is `before` at the first position of its value
        first = np.searchsorted(-desc, -p, side="left")
        keep &= before[first] < spec.top_p
        p = np.where(keep, p, 0.0)
        p /= p.sum()
    return p


def chi_square_pvalue(counts: np.ndarray, probs: np.ndarray, min_expected: float = 5.0) -> float:
    """Pearson chi-square goodness of fit; bins with expected count below `min_expected` are
    pooled into one bin (so the chi-square approximation holds). Draws on a token of
    probability 0 are an outright failure (returns 0)."""
    counts = np.asarray(counts, dtype=np.float64)
    probs = np.asarray(probs, dtype=np.float64)
    n = counts.sum()
    if (counts[probs == 0] > 0).any():
        return 0.0
    expected = n * probs
    big = expected >= min_expected
    obs = list(counts[big])
    exp = list(expected[big])
    small_e = expected[~big & (probs > 0)].sum()
    if small_e > 0:
        obs.append(counts[~big & (probs > 0)].sum())
        exp.append(small_e)
    if len(obs) < 2:
        return 1.0
    return float(stats.chisquare(obs, exp).pvalue)
