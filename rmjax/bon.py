"""Best-of-N selection, exactly: the expected accuracy of picking from n of a problem's N candidates.

Why it exists: accuracy@n of a reward model (pick the top-scored of n sampled candidates) is
usually estimated by drawing random subsets, which is noisy for small n and slow for large N.
Here every statistic is the EXACT mean over all C(N, n) subsets of n candidates, computed by
counting, not by sampling:

  top_pick_accuracy  the candidate with the highest score is picked; candidates tied on the top
                     score share the pick evenly (a subset whose top holds t candidates, c of
                     them correct, counts c / t). A candidate with no score (None: a step did
                     not fit) ranks below every scored one and is never picked: a subset of
                     unscored candidates only counts 0, as the reward model chose none of them.
  oracle             pass@n: the subset holds at least one correct candidate.
  majority           the answer given most often in the subset wins; candidates without an
                     answer (None) do not vote; answers tied for the most votes share the win
                     evenly; a winning answer counts as the fraction of its candidates (among all
                     N) that are correct, i.e. one of its candidates is picked at random. A
                     subset in which no candidate answered counts 0.

Counting: for top-pick, a subset whose best score is v takes t >= 1 of the g candidates scored
v and the rest from the b scored lower: sum_t C(g, t) C(b, n - t), and by symmetry the expected
fraction correct among the t is c / g. For majority, per answer A and k of its m_A candidates
in the subset, a polynomial product over the other answers counts the ways they take at most k
votes each, keeping how many tie at k (exact integers).
"""

from __future__ import annotations

import functools
from fractions import Fraction
from math import comb
from typing import Optional, Sequence


def n_values(num: int) -> list[int]:
  """1, 2, 4, ... up to `num`, and `num` itself when it is no power of two."""
  out, n = [], 1
  while n <= num:
    out.append(n)
    n *= 2
  if num >= 1 and out[-1] != num:
    out.append(num)
  return out


def _check(num: int, n: int) -> None:
  if not 1 <= n <= num:
    raise ValueError(f"n={n} must be in [1, {num}] (the number of candidates)")


def top_pick_accuracy(scores: Sequence[Optional[float]], correct: Sequence[bool], n: int) -> float:
  """Mean over all n-subsets of the fraction correct among the subset's top-scored candidates."""
  num = len(scores)
  _check(num, n)
  keyed = [(float("-inf") if s is None else float(s), bool(c)) for s, c in zip(scores, correct, strict=True)]
  total, below = Fraction(0), num
  for value in sorted({s for s, _ in keyed}, reverse=True):
    g = sum(1 for s, _ in keyed if s == value)
    c = sum(1 for s, ok in keyed if s == value and ok)
    below -= g
    if c and value != float("-inf"):  # the unscored are never picked (module docstring)
      ways = sum(comb(g, t) * comb(below, n - t) for t in range(1, min(g, n) + 1))
      total += Fraction(c, g) * ways
  return float(total / comb(num, n))


def oracle(correct: Sequence[bool], n: int) -> float:
  """pass@n: the share of n-subsets holding at least one correct candidate."""
  num = len(correct)
  _check(num, n)
  wrong = num - sum(bool(c) for c in correct)
  return float(1 - Fraction(comb(wrong, n), comb(num, n)))


def majority(answers: Sequence[Optional[str]], correct: Sequence[bool], n: int) -> float:
  """Mean over all n-subsets of majority vote's correctness (ties and abstentions: module docstring)."""
  num = len(answers)
  _check(num, n)
  groups: dict[str, list[int]] = {}  # answer -> [candidates, correct ones]
  abstain = 0
  for a, c in zip(answers, correct, strict=True):
    if a is None:
      abstain += 1
      continue
    g = groups.setdefault(a, [0, 0])
    g[0] += 1
    g[1] += bool(c)
  total = Fraction(0)
  for answer, (m_a, c_a) in groups.items():
    if not c_a:
      continue
    others = tuple(sorted(m for b, (m, _) in groups.items() if b != answer))
    for k in range(1, min(m_a, n) + 1):
      total += Fraction(c_a, m_a) * comb(m_a, k) * _ways_to_win(others, abstain, k, n - k)
  return float(total / comb(num, n))


@functools.lru_cache(maxsize=4096)  # answers of one size see the same rivals: computed once
def _ways_to_win(others: tuple[int, ...], abstain: int, k: int, rest: int) -> Fraction:
  """Sum over the ways to fill `rest` places from the other answers (each taking at most k,
  the winner's votes) and the abstainers, of 1 / (answers tied at k, the winner included)."""
  free = abstain + sum(m for m in others if m < k)  # cannot reach k: never tie
  rivals = [m for m in others if m >= k]
  # ways[s][t]: ways to take s candidates from the rivals seen so far, t of them at exactly k votes
  ways = [[0] * (len(rivals) + 1) for _ in range(rest + 1)]
  ways[0][0] = 1
  for m in rivals:
    new = [[0] * (len(rivals) + 1) for _ in range(rest + 1)]
    for s in range(rest + 1):
      for t, w in enumerate(ways[s]):
        if w:
          for j in range(min(k, rest - s) + 1):
            new[s + j][t + (j == k)] += w * comb(m, j)
    ways = new
  return sum((Fraction(w * comb(free, rest - s), t + 1) for s in range(rest + 1)
              for t, w in enumerate(ways[s]) if w), Fraction(0))
