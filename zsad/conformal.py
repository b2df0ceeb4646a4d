"""Split-conformal thresholds: a threshold on the scores of n good images that flags a new good part with a stated
probability at most (docs/METHODS.md, "Calibrated false-alarm rate").

For exchangeable scores S_1..S_n of good images and S_new of a new good part, S_new is above the k-th smallest S_(k)
with probability at most (n + 1 - k) / (n + 1). The rate ALPHA a user asks for fixes k = ceil((n + 1)(1 - ALPHA)), which
needs k <= n, i.e. n >= 1 / ALPHA - 1 good images (19 for 5%, 99 for 1%); with fewer, the best reachable rate is
1 / (n + 1) (k = n, the threshold just above the largest good score).

```python
>>> conformal_threshold([0.2, 0.5, 0.3, 0.4], 0.2)            # k = ceil(5 * 0.8) = 4: just above 0.5
ConformalThreshold(threshold=0.5000000000000001, rank=4, num_good=4)
>>> conformal_threshold([0.2, 0.5, 0.3, 0.4], 0.2).bound      # (4 + 1 - 4) / (4 + 1)
0.2
```

Hand-written (a few lines of order statistics): no well-kept library computes this index and its refusal as stated
here (MAPIE's conformal classes wrap estimators, not a list of scores).
"""

import math
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from .errors import ZSADError

# (n + 1)(1 - ALPHA) is an integer for the rates users ask (0.05 with n = 19 is 19), but float arithmetic can land a
# hair above it (19.000000000000004), which ceil would turn into 20: round first.
_ROUNDING_DIGITS = 9


@dataclass(frozen=True)
class ConformalThreshold:
    """``threshold`` lies just above the ``rank``-th smallest of ``num_good`` good scores; a new good part reaches it
    with probability at most ``bound``."""

    threshold: float
    rank: int
    num_good: int

    @property
    def bound(self) -> float:
        return false_alarm_bound(self.num_good, self.rank)


def check_rate(rate: float) -> None:
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 < rate < 1.0:
        raise ZSADError(f"The false-alarm rate must be a number between 0 and 1 (e.g. 0.05 for 1 in 20), got {rate!r}.")


def conformal_rank(num_good: int, rate: float) -> int:
    """k = ceil((n + 1)(1 - rate)): the order statistic whose threshold flags at most ``rate`` of new good parts."""
    check_rate(rate)
    return math.ceil(round((num_good + 1) * (1.0 - rate), _ROUNDING_DIGITS))


def good_images_needed(rate: float) -> int:
    """The fewest good images that reach ``rate``: the smallest n with ceil((n + 1)(1 - rate)) <= n."""
    check_rate(rate)
    return max(1, math.ceil(round(1.0 / rate - 1.0, _ROUNDING_DIGITS)))


def false_alarm_bound(num_good: int, rank: int) -> float:
    """(n + 1 - k) / (n + 1): the largest probability that a new good part scores above the k-th smallest of n."""
    return (num_good + 1 - rank) / (num_good + 1)


def rate_in_words(num_good: int, rank: int) -> str:
    """The bound as a reduced fraction in words: n = 19, k = 19 -> "1 in 20"; n = 10, k = 9 -> "2 in 11"."""
    bound = Fraction(num_good + 1 - rank, num_good + 1)
    return f"{bound.numerator} in {bound.denominator}"


def conformal_threshold(scores, rate: float, allow_higher_rate: bool = False) -> ConformalThreshold:
    """The split-conformal threshold for ``rate`` on the good ``scores`` (leave-one-out scores of the references):
    just above the k-th smallest score, k = ceil((n + 1)(1 - rate)), so that "score >= threshold" flags a new good
    part with probability at most (n + 1 - k) / (n + 1) <= rate.

    With too few scores (k > n) this is a ZSADError naming the number needed, unless ``allow_higher_rate``: then k = n
    (just above the largest score) and the bound is 1 / (n + 1), higher than ``rate``. Thresholds stay at most 1, so
    a score of exactly 1 (saturated) is always flagged.
    """
    values = np.sort(np.asarray(scores, dtype=np.float64))
    if values.size == 0 or not np.isfinite(values).all():
        raise ZSADError(f"A conformal threshold needs at least one finite good score, got {values.tolist()}.")
    rank = reachable_rank(values.size, rate, allow_higher_rate)
    # "score >= threshold" must flag exactly the scores above the k-th smallest: the next float64 above it.
    threshold = min(1.0, float(np.nextafter(values[rank - 1], np.inf)))
    return ConformalThreshold(threshold, rank, int(values.size))


def reachable_rank(num_good: int, rate: float, allow_higher_rate: bool = False) -> int:
    """k for ``rate`` with ``num_good`` scores; a ZSADError naming the number of good images needed when k > n, unless
    ``allow_higher_rate`` (then k = n: the best reachable rate, 1 / (n + 1))."""
    rank = conformal_rank(num_good, rate)
    if rank <= num_good:
        return rank
    if not allow_higher_rate:
        raise ZSADError(
            f"A false-alarm rate of {rate:g} needs at least {good_images_needed(rate)} good images; {num_good} were given, "
            f"whose best reachable rate is 1 in {num_good + 1}. Add good images, ask for a rate of at least "
            f"{1 / (num_good + 1):.3g}, or accept 1 in {num_good + 1} (--allow-higher-rate, allow_higher_rate=True).")
    return num_good
