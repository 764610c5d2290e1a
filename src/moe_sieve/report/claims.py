"""The paper's claims, each judged on the study's own runs as "held here", "not held here" or "not testable here",
with the numbers and the reason (a missing condition or too few seeds makes a claim not testable, never held).

Conditions are found by what they are (their ``strategy`` and ``k``, from the run's config.json and selection.json
or results.csv's ``k``/``method``/``variant`` columns, else the condition name; see report/data.py), not by their
names; the rules are in docs/report.md:

- full, the MoE-agnostic LoRA: strategy ``full`` (the ``--reference`` condition when it is one of them);
- hot-k: strategy ``topk`` at the report's budget ``--k`` (25% resolved against the routed experts per layer);
- random-k: strategy ``random`` at that budget; greedy: strategy ``greedy`` (its k is its mean per-layer budget);
- the k sweep: every ``topk`` condition, one per k, with ``full`` at k = its expert count; routed adapters:
  strategy ``routed-<variant>``.

When several conditions fit one role, the one with the most finished seeds is used (ties: name order) and the
others are named in the reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..seed_stats import ComparisonRow, MetricInfo, RunRecord, compare_runs

HELD, NOT_HELD, UNTESTABLE = "held here", "not held here", "not testable here"
VERDICTS = (HELD, NOT_HELD, UNTESTABLE)


def _p(value: float | None) -> str:
    if value is None:
        return "–"
    return "< 0.001" if value < 0.001 else f"= {value:.3f}"


@dataclass
class Claim:
    model: str
    task: str
    claim: str
    verdict: str
    numbers: str
    reason: str


@dataclass
class Condition:
    """One condition of a (model, task): its role-defining strategy and k, and its finished seeds."""

    name: str
    strategy: str | None
    k: int | None
    seeds: int
    unconverged: int
    selections: frozenset[str] = frozenset()  # the distinct per-layer expert sets its runs trained (JSON)


class _Judge:
    """The claims of one (model, task)."""

    def __init__(
        self,
        model: str,
        task: str,
        records: Sequence[RunRecord],
        conditions: dict[str, Condition],
        info: MetricInfo,
        reference: str,
        margins: Sequence[float],
        alpha: float,
        budget: int | None,
        budget_note: str,
    ):
        self.model, self.task, self.records, self.conditions = model, task, records, conditions
        self.info, self.unit, self.reference, self.margins, self.alpha = info, info.unit.name, reference, margins, alpha
        self.budget, self.budget_note = budget, budget_note
        self.claims: list[Claim] = []

    # --- helpers ---------------------------------------------------------------------------------------------

    def add(self, claim: str, verdict: str, numbers: str, reason: str) -> None:
        assert verdict in VERDICTS
        self.claims.append(Claim(self.model, self.task, claim, verdict, numbers or "–", reason))

    def pick(self, strategy: str | None, k: int | None = None, prefer: str | None = None) -> tuple[str | None, str]:
        """The condition of a role, and a note naming the other candidates ("" when there are none)."""
        found = [
            c
            for c in self.conditions.values()
            if (strategy is None or c.strategy == strategy) and (k is None or c.k == k)
        ]
        if not found:
            return None, ""
        found.sort(key=lambda c: (c.name != prefer, -c.seeds, c.name))
        others = [c.name for c in found[1:]]
        return found[0].name, (f" (also fits: {', '.join(others)}; used {found[0].name})" if others else "")

    def compare(self, condition: str, against: str) -> ComparisonRow:
        subset = [r for r in self.records if r.condition in (condition, against)]
        rows = compare_runs(subset, against, self.margins, self.alpha, metric=self.info.name, unit=self.unit)
        return next(r for r in rows if r.condition == condition)

    def num(self, value: float | None, sign: bool = True) -> str:
        if value is None:
            return "–"
        digits = ".2f" if self.unit == "pp" else ".3f"
        return f"{value:{'+' if sign else ''}{digits}} {self.unit}"

    def interval(self, row: ComparisonRow) -> str:
        ci = "" if row.ci_low is None else f" [95% CI {self.num(row.ci_low)}, {self.num(row.ci_high)}]"
        return f"Δ = {self.num(row.delta)}{ci}, {row.n_paired} paired seeds"

    def better(self, row: ComparisonRow) -> tuple[float, float]:
        """The CI of the difference turned so that positive means better (lower is better for an NLL)."""
        lo, hi = row.ci_low, row.ci_high
        return (lo, hi) if self.info.higher_is_better else (-hi, -lo)

    def unconverged(self, *names: str) -> str:
        flagged = [f"{self.conditions[n].unconverged} run(s) of {n}" for n in names if self.conditions[n].unconverged]
        return f"; {', '.join(flagged)} did not converge (†)" if flagged else ""

    def paired_or_none(self, condition: str, against: str) -> tuple[ComparisonRow | None, str]:
        row = self.compare(condition, against)
        if row.n_paired is None or row.n_paired < 2 or row.ci_low is None:
            paired = row.n_paired or 0
            return None, f"{paired} seed(s) pair up between {condition} and {against}; a paired interval needs 2"
        return row, ""

    @property
    def direction(self) -> str:
        return "higher" if self.info.higher_is_better else "lower"

    # --- the claims ------------------------------------------------------------------------------------------

    def judge(self) -> list[Claim]:
        full, full_note = self.pick("full", prefer=self.reference)
        hot, hot_note = self.pick("topk", self.budget) if self.budget is not None else (None, "")
        k_text = f"k = {self.budget}" if self.budget is not None else "the budget"
        self.equivalence(full, hot, full_note + hot_note)
        self.hot_vs_random(hot, hot_note, k_text)
        self.greedy_vs_uniform()
        self.std_claim(full, hot, full_note + hot_note)
        self.k_vs_variance()
        self.routed_vs_lora(full, full_note)
        return self.claims

    def no_role(self, role: str) -> str:
        """Why a budget-bound role has no condition: none at the budget, or the budget itself is unknown."""
        if self.budget is None:
            return self.budget_note
        return f"no {role} condition at {self.budget_note}"

    def missing(self, full: str | None, hot: str | None) -> str:
        parts = [] if full is not None else ["no condition with strategy full"]
        if hot is None:
            parts.append(self.no_role("top-k"))
        return " and ".join(parts)

    def equivalence(self, full: str | None, hot: str | None, note: str) -> None:
        for m in self.margins:
            claim = f"{hot or 'hot-k'} ≈ {full or 'full'}: equivalent within ±{m:g} {self.unit} (TOST)"
            if full is None or hot is None:
                self.add(claim, UNTESTABLE, "", self.missing(full, hot))
                continue
            row, why = self.paired_or_none(hot, full)
            if row is None:
                self.add(claim, UNTESTABLE, "", why)
                continue
            t = row.tost.get(f"{m:g}") or {}
            p = t.get("p")
            numbers = f"{self.interval(row)}, TOST p {_p(p)}"
            extra = self.unconverged(hot, full) + note
            if t.get("equivalent"):
                self.add(claim, HELD, numbers, f"both one-sided tests reject at α = {self.alpha:g}{extra}")
            elif abs(row.delta or 0.0) >= m:
                self.add(claim, NOT_HELD, numbers, f"the mean difference itself lies outside ±{m:g} {self.unit}{extra}")
            else:
                self.add(
                    claim,
                    NOT_HELD,
                    numbers,
                    f"TOST p ≥ α = {self.alpha:g}: with {row.n_paired} seeds the interval is too wide to show "
                    f"equivalence within ±{m:g} {self.unit}{extra}",
                )

    def hot_vs_random(self, hot: str | None, hot_note: str, k_text: str) -> None:
        random, random_note = self.pick("random", self.budget) if self.budget is not None else (None, "")
        claim = f"{hot or 'hot-k'} beats {random or 'random-k'} at the same budget ({k_text})"
        if hot is None or random is None:
            parts = {self.no_role(role) for role, name in (("top-k", hot), ("random", random)) if name is None}
            self.add(claim, UNTESTABLE, "", " and ".join(sorted(parts)))
            return
        row, why = self.paired_or_none(hot, random)
        if row is None:
            self.add(claim, UNTESTABLE, "", why)
            return
        lo, hi = self.better(row)
        extra = self.unconverged(hot, random) + hot_note + random_note
        numbers = f"{self.interval(row)}, paired t p {_p(row.ttest_p)}"
        if lo > 0:
            self.add(claim, HELD, numbers, f"the 95% CI excludes 0 on the better ({self.direction}) side{extra}")
        elif hi < 0:
            self.add(claim, NOT_HELD, numbers, f"{random} is better: the 95% CI excludes 0 on its side{extra}")
        else:
            self.add(claim, NOT_HELD, numbers, f"the 95% CI includes 0: no difference shown{extra}")

    def greedy_vs_uniform(self) -> None:
        greedy, greedy_note = self.pick("greedy", self.budget)
        if greedy is None:
            greedy, greedy_note = self.pick("greedy")
        claim = "greedy allocation does not beat uniform top-k at the same budget"
        if greedy is None:
            self.add(claim, UNTESTABLE, "", "no condition with strategy greedy")
            return
        k = self.conditions[greedy].k
        uniform, uniform_note = self.pick("topk", k) if k is not None else (None, "")
        claim = f"{greedy} does not beat uniform top-k ({uniform or 'top-k'}) at the same budget (k = {k or '?'})"
        if uniform is None:
            reason = (
                "greedy's budget is unknown (no selection.json or k)" if k is None else f"no top-k condition at k = {k}"
            )
            self.add(claim, UNTESTABLE, "", reason)
            return
        same = self.conditions[greedy].selections
        if len(same) == 1 and same == self.conditions[uniform].selections:
            reason = (
                "greedy allocation selects exactly the experts of uniform top-k in every layer of this profile, "
                "so the two conditions train the same adapters: nothing to compare"
            )
            self.add(claim, UNTESTABLE, "identical selections", reason)
            return
        row, why = self.paired_or_none(greedy, uniform)
        if row is None:
            self.add(claim, UNTESTABLE, "", why)
            return
        lo, hi = self.better(row)
        extra = self.unconverged(greedy, uniform) + greedy_note + uniform_note
        numbers = f"{self.interval(row)} (greedy − uniform), paired t p {_p(row.ttest_p)}"
        if lo > 0:
            self.add(claim, NOT_HELD, numbers, f"greedy is better: the 95% CI excludes 0{extra}")
        else:
            self.add(
                claim,
                HELD,
                numbers,
                (
                    "greedy is worse: the 95% CI excludes 0 on uniform's side"
                    if hi < 0
                    else f"the 95% CI includes 0: greedy's advantage is not shown (absence of evidence with "
                    f"{row.n_paired} seeds)"
                )
                + extra,
            )

    def std_claim(self, full: str | None, hot: str | None, note: str) -> None:
        from scipy import stats

        claim = f"{hot or 'hot-k'}'s seed std ≤ {full or 'full'}'s"
        if full is None or hot is None:
            self.add(claim, UNTESTABLE, "", self.missing(full, hot))
            return
        values = {c: np.array([r.value for r in self.records if r.condition == c]) for c in (hot, full)}
        if min(len(v) for v in values.values()) < 2:
            self.add(claim, UNTESTABLE, "", "a seed std needs at least 2 finished seeds per condition")
            return
        s_hot, s_full = (float(values[c].std(ddof=1)) for c in (hot, full))
        scale = 100.0 if self.unit == "pp" else 1.0
        n_hot, n_full = len(values[hot]), len(values[full])
        numbers = f"std {self.num(scale * s_hot, False)} vs {self.num(scale * s_full, False)} (n = {n_hot}, {n_full})"
        extra = self.unconverged(hot, full) + note
        if s_full == 0:
            verdict = HELD if s_hot == 0 else NOT_HELD
            self.add(claim, verdict, numbers, f"{full}'s seeds agree exactly{extra}")
            return
        ratio = s_hot / s_full
        # F interval of the variance ratio (independent normal samples), as the square root for the std ratio
        lo = ratio / np.sqrt(stats.f.ppf(0.975, n_hot - 1, n_full - 1))
        hi = ratio / np.sqrt(stats.f.ppf(0.025, n_hot - 1, n_full - 1))
        numbers += f", ratio {ratio:.2f} [95% F interval {lo:.2f}, {hi:.2f}]"
        certainty = (
            "; the interval includes 1, so the seeds cannot tell" if lo <= 1 <= hi else "; the interval excludes 1"
        )
        self.add(
            claim,
            HELD if ratio <= 1 else NOT_HELD,
            numbers,
            f"point estimate of the ratio {'≤' if ratio <= 1 else '>'} 1{certainty}{extra}",
        )

    def k_vs_variance(self) -> None:
        from scipy import stats

        claim = "k vs variance: the seed std falls as k grows (uniform top-k)"
        by_k: dict[int, str] = {}
        # top-k at every k, and full LoRA as the sweep's end (top-E of E experts is all of them)
        for c in sorted(self.conditions.values(), key=lambda c: (c.strategy != "topk", -c.seeds, c.name)):
            if c.strategy in ("topk", "full") and c.k and c.seeds >= 2:
                by_k.setdefault(c.k, c.name)
        if len(by_k) < 3:
            self.add(
                claim,
                UNTESTABLE,
                "",
                f"{len(by_k)} top-k budget(s) with 2+ seeds ({', '.join(f'k = {k}' for k in sorted(by_k)) or 'none'});"
                " a trend needs 3",
            )
            return
        ks = sorted(by_k)
        scale = 100.0 if self.unit == "pp" else 1.0
        stds = [float(np.std([r.value for r in self.records if r.condition == by_k[k]], ddof=1)) for k in ks]
        rho = float(stats.spearmanr(ks, stds).statistic)
        numbers = "seed std " + ", ".join(
            f"k = {k}: {self.num(scale * s, False)}" for k, s in zip(ks, stds, strict=True)
        )
        numbers += f"; Spearman ρ = {rho:+.2f}"
        extra = self.unconverged(*by_k.values())
        if rho < 0 and stds[-1] < stds[0]:
            self.add(
                claim,
                HELD,
                numbers,
                f"std is lower at the largest k than the smallest and ρ < 0 (descriptive, no test){extra}",
            )
        else:
            self.add(
                claim,
                NOT_HELD,
                numbers,
                f"std does not fall with k (ρ ≥ 0 or std at the largest k ≥ at the smallest){extra}",
            )

    def routed_vs_lora(self, full: str | None, full_note: str) -> None:
        routed = sorted(c.name for c in self.conditions.values() if (c.strategy or "").startswith("routed-"))
        if not routed or full is None:
            claim = f"routed adapters beat MoE-agnostic LoRA ({full or 'full'})"
            reason = " and ".join(
                p
                for p in (
                    "" if full else "no condition with strategy full",
                    "" if routed else "no routed condition (method routed)",
                )
                if p
            )
            self.add(claim, UNTESTABLE, "", reason)
            return
        for name in routed:
            claim = f"{name} ({self.conditions[name].strategy}) beats MoE-agnostic LoRA ({full})"
            row, why = self.paired_or_none(name, full)
            if row is None:
                self.add(claim, UNTESTABLE, "", why)
                continue
            lo, hi = self.better(row)
            extra = self.unconverged(name, full) + full_note
            numbers = f"{self.interval(row)}, paired t p {_p(row.ttest_p)}"
            if lo > 0:
                self.add(claim, HELD, numbers, f"the 95% CI excludes 0 on the better ({self.direction}) side{extra}")
            elif hi < 0:
                self.add(claim, NOT_HELD, numbers, f"{full} is better: the 95% CI excludes 0 on its side{extra}")
            else:
                self.add(claim, NOT_HELD, numbers, f"the 95% CI includes 0: no difference shown{extra}")


def judge_claims(
    records: Sequence[RunRecord],
    conditions: dict[tuple[str, str], dict[str, Condition]],
    info: MetricInfo,
    reference: str,
    margins: Sequence[float],
    alpha: float,
    budget: int | None,
    budget_note: str,
) -> list[Claim]:
    """Every claim for every (model, task) of ``conditions``, on the runs in ``records``."""
    claims = []
    for (model, task), conds in sorted(conditions.items()):
        subset = [r for r in records if (r.model, r.task) == (model, task)]
        judge = _Judge(model, task, subset, conds, info, reference, margins, alpha, budget, budget_note)
        claims += judge.judge()
    return claims
