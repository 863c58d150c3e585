"""Cost–quality metrics: the non-decreasing convex hull, AIQ (RouterBench) and APGR (RouteLLM).

A router evaluated at several settings gives points (mean cost, mean quality). Mixing two settings
at random reaches any point on the segment between them, so what a router can deliver for a
spend of at most c is Q(c): the upper concave envelope of its points, non-decreasing, 0 below its
cheapest point. Then over a common cost range [c_lo, c_hi]:

* AIQ  = (1 / (c_hi − c_lo)) ∫ Q(c) dc                         (RouterBench's average quality)
* APGR = mean over c ∈ [c_weak, c_strong] of (Q(c) − q_weak) / (q_strong − q_weak)
  with weak = the cheapest single expert and strong = the best single expert: the share of the
  quality gap between them that the router recovers at each spend (RouteLLM's APGR, with cost in
  place of the share of calls to the strong model).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

Point = tuple[float, float]  # (cost, quality)


def hull(points: Sequence[Point]) -> list[Point]:
    """The non-decreasing upper concave envelope of `points`, sorted by cost."""
    pts = sorted(set(points), key=lambda p: (p[0], -p[1]))
    frontier: list[Point] = []
    for c, q in pts:  # Pareto frontier: strictly better quality for more cost
        if not frontier or q > frontier[-1][1] + 1e-12:
            frontier.append((c, q))
    upper: list[Point] = []
    for p in frontier:  # upper concave envelope (monotone chain)
        while len(upper) >= 2 and _cross(upper[-2], upper[-1], p) >= 0:
            upper.pop()
        upper.append(p)
    return upper


def _cross(o: Point, a: Point, b: Point) -> float:
    return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])


def best_at(points: Sequence[Point], cost: float) -> float:
    """Q(cost): the best quality reachable spending at most `cost` (0 below the cheapest point)."""
    h = hull(points)
    if not h or cost < h[0][0] - 1e-15:
        return 0.0
    for (c0, q0), (c1, q1) in itertools.pairwise(h):
        if c0 <= cost <= c1:
            return q0 + (q1 - q0) * (cost - c0) / (c1 - c0) if c1 > c0 else max(q0, q1)
    return h[-1][1]


def aiq(points: Sequence[Point], lo: float, hi: float) -> float:
    """Average of Q(c) over [lo, hi], integrated exactly (Q is piecewise linear)."""
    if hi <= lo:
        return best_at(points, hi)
    return integral(points, lo, hi) / (hi - lo)


def integral(points: Sequence[Point], lo: float, hi: float) -> float:
    """∫ Q(c) dc over [lo, hi]: 0 below the cheapest point, the hull's segments (trapezoids),
    flat past the last vertex."""
    h = hull(points)
    if not h or hi <= lo:
        return 0.0
    knots = sorted({lo, hi, *(c for c, _ in h if lo < c < hi)})
    total = 0.0
    for a, b in itertools.pairwise(knots):
        if b <= h[0][0]:
            continue  # below the cheapest point Q is 0 (at the point itself a single value)
        total += (b - a) * (best_at(points, a if a >= h[0][0] else b) + best_at(points, b)) / 2
    return total


def apgr(points: Sequence[Point], weak: Point, strong: Point) -> float:
    """Average share of the weak→strong quality gap recovered over the weak..strong cost range."""
    gap = strong[1] - weak[1]
    if gap <= 0:
        return float("nan")
    lo, hi = sorted((weak[0], strong[0]))
    return (aiq(points, lo, hi) - weak[1]) / gap
