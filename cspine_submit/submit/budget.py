"""The time budget: a running projection of the finish time that lowers the slices per vertebra when it overshoots.

Used by the run loop (:func:`cspine_submit.submit.run.stream_studies`) after every study; pure arithmetic on the
seconds it is told, so it is tested without a run.
"""

from __future__ import annotations

import math

import numpy as np


class BudgetController:
    """Keeps a running projection of the finish time and lowers the slices per vertebra when it overshoots.

    Parameters
    ----------
    budget_s : float or None
        Seconds allowed for the whole run (None: no budget).
    n_studies : int
        Studies to process in this run.
    slices_per_vertebra : int
        K to start with (from the model config).
    min_slices : int
        K never goes below this.
    min_history : int
        Studies measured (since the last change of K) before K is changed again.
    safety : float
        Plan to finish within ``safety * budget_s``, leaving room for writing and for slow studies at the end.

    The projection uses the mean seconds per study of the studies done at the current K (studies the workers
    prefetched at an older K are not counted: they would make a change of K look ineffective and lower K again).
    When ``elapsed + remaining * mean`` exceeds the plan, K is scaled by ``time left per study / mean`` (the cost
    per study is roughly proportional to K: decoding and scoring dominate) and rounded down. When the whole budget
    is spent, :attr:`exhausted` is set and the remaining studies get their priors.
    """

    def __init__(self, budget_s, n_studies: int, slices_per_vertebra: int, *, min_slices: int = 2,
                 safety: float = 0.95, min_history: int = 3):
        self.budget_s = None if budget_s is None else float(budget_s)
        # The first studies carry one-off costs (graph tracing, worker start-up); acting on them alone overreacts.
        self.min_history = max(1, int(min_history))
        self.n_studies = int(n_studies)
        self.k = int(slices_per_vertebra)
        self.min_slices = max(1, min(int(min_slices), self.k))
        self.safety = float(safety)
        self.events: list[dict] = []
        self.exhausted = False
        self._since_change: list[float] = []

    def projected_total(self, elapsed: float, done: int) -> float | None:
        """Projected seconds for the whole run, or None before the first study."""
        if not self._since_change:
            return None
        return elapsed + (self.n_studies - done) * float(np.mean(self._since_change))

    def update(self, study_seconds: float, elapsed: float, done: int, k: int | None = None) -> int:
        """Record one finished study, prepared with ``k`` slices per vertebra (default: the current K); returns
        the K to use for studies submitted from now on."""
        if k is None or int(k) == self.k:
            self._since_change.append(float(study_seconds))
        if self.budget_s is None or done >= self.n_studies:
            return self.k
        if elapsed >= self.budget_s:
            if not self.exhausted:
                self.exhausted = True
                self.events.append({"after_study": done, "elapsed_s": round(elapsed, 3), "action":
                                    f"budget of {self.budget_s:.0f} s spent; the remaining {self.n_studies - done} "
                                    "studies get their priors"})
            return self.k
        projected = self.projected_total(elapsed, done)
        plan = self.safety * self.budget_s
        if (projected is not None and projected > plan and self.k > self.min_slices
                and len(self._since_change) >= self.min_history):
            mean = max(float(np.mean(self._since_change)), 1e-9)
            per_study_left = (plan - elapsed) / (self.n_studies - done)
            new_k = max(self.min_slices, min(self.k - 1, int(math.floor(self.k * per_study_left / mean))))
            self.events.append({
                "after_study": done, "elapsed_s": round(elapsed, 3), "projected_s": round(projected, 3),
                "budget_s": self.budget_s, "slices_per_vertebra": [self.k, new_k],
                "action": f"projected {projected:.0f} s > {plan:.0f} s planned: slices per vertebra {self.k} -> {new_k}",
            })
            self.k = new_k
            self._since_change = []
        return self.k
