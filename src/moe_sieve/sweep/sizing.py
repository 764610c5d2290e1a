"""How many seeds a study needs: the power of a paired TOST equivalence test, from a pilot's paired std.

With per-seed differences d_i ~ N(mu, sd^2), TOST at margin m and level alpha declares equivalence when
|mean(d)| < m - t_{1-alpha, n-1} * s / sqrt(n). The mean and the sample std s are independent, so the power is
an exact one-dimensional integral over the chi distribution of s (no normal approximation).
"""

from __future__ import annotations

import math


def tost_power(sd: float, n: int, margin: float, *, alpha: float = 0.05, true_difference: float = 0.0) -> float:
    """Probability that a paired TOST with ``n`` seeds declares equivalence within ``margin`` (same units as
    ``sd``) when the true mean difference is ``true_difference``."""
    from scipy import integrate, stats

    if n < 2:
        return 0.0
    if sd <= 0:
        return 1.0 if abs(true_difference) < margin else 0.0
    df = n - 1
    t_crit = stats.t.ppf(1 - alpha, df)
    se = sd / math.sqrt(n)

    def inside(q: float) -> float:  # q = (n-1) s^2 / sd^2 ~ chi2(df)
        half = margin - t_crit * sd * math.sqrt(q / df) / math.sqrt(n)
        if half <= 0:
            return 0.0
        return stats.norm.cdf((half - true_difference) / se) - stats.norm.cdf((-half - true_difference) / se)

    upper = df * ((margin * math.sqrt(n) / (t_crit * sd)) ** 2)  # beyond it the interval is empty
    value, _ = integrate.quad(lambda q: inside(q) * stats.chi2.pdf(q, df), 0, upper, limit=200)
    return float(value)


def seeds_for_tost(
    sd: float, margin: float, *, alpha: float = 0.05, power: float = 0.8, minimum: int = 8, maximum: int = 500
) -> int:
    """The smallest number of seeds (at least ``minimum``) whose TOST power reaches ``power`` at a true
    difference of 0; ``maximum`` + 1 when even ``maximum`` seeds fall short."""
    for n in range(max(2, minimum), maximum + 1):
        if tost_power(sd, n, margin, alpha=alpha) >= power:
            return n
    return maximum + 1
