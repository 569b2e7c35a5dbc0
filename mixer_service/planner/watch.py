"""The overfitting watch: one run's held-out domain curve, joined with its exact repetitions, forecast.

Within one run the law is used in terms of the repetitions ``E`` of the domain set (sequences of the
repeated source served / its sequences per epoch, exact from the job's mixture plan), not of tokens:

    L(E) = C + A·E^(−a) + G·E^β          A, G, C ≥ 0;  a, β > 0

At a constant δ, ``E = δ·T/|D|``, so this is the paper's per-δ curve ``A_train·T^b_train + C_train +
A_gap·T^b_gap`` with ``a = −b_train(δ)`` and ``β = b_gap(δ)``: the law fitted across runs, restricted to
the run's own δ. When δ changes mid-run, the state that carries over is E: more domain data lowers the
train term, more repetitions raise the gap, and web tokens' effect on domain loss is held at what the run
showed. L(E) turns up at ``E* = (a·A / (β·G))^(1/(a+β))``; the forecast is the first step at which the
current schedule serves past E*.

A proposal needs what one run cannot show: how the loss depends on δ. It comes from the law fitted across
runs, read inside the run at the run's average fraction δ̄ = E·|D|/T (``Calibrated``, two constants fitted
on the run), and is the schedule change with the lowest predicted domain loss at the final step that does
not raise the web loss by more than a set amount. docs/planner.md explains the choices.

All work is bounded: a fixed grid of exponents (each point one 3-column NNLS with an iteration cap), a
fixed number of bootstrap refits and a fixed candidate set.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from typing import Any

import numpy as np

from mixer_service.engine.mixture import MixturePlan
from mixer_service.planner.overfitting_law import OverfittingLaw

MIN_POINTS = 6  # eval points with E > 0 before anything is forecast
A_GRID = np.geomspace(0.02, 1.0, 14)  # a = −b_train(δ): the paper's |b_train| < 1
BETA_GRID = np.geomspace(0.05, 1.0, 16)  # β = b_gap(δ) < 1 where the paper studies δ
N_BOOTSTRAP = 40
MIN_EXCESS = 0.005  # a warning needs at least this much predicted loss above the minimum at the end
WARN_SHARE = 0.95  # share of bootstrap refits that must turn up before the end for a warning
# proposed δ' = factor · current δ: lower (less repetition) or higher (more domain data, less web data)
DELTA_FACTORS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.25, 1.5, 2.0)
# A law prediction outside [0, this × the highest observed loss] is the law read outside its regime
PLAUSIBLE_FACTOR = 2.0
START_FRACTIONS = (0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75)  # S = S0 + f·(end − S0)


@dataclass(frozen=True)
class CurveFit:
    """L(E) = C + A·E^(−a) + G·E^β; ``turn_e`` is E*, or None when the curve never turns up."""

    C: float
    A: float
    a: float
    G: float
    beta: float
    rmse: float

    def loss(self, e: np.ndarray | float) -> np.ndarray:
        x = np.maximum(np.asarray(e, float), 1e-12)
        return self.C + self.A * x ** -self.a + self.G * x ** self.beta

    @property
    def turn_e(self) -> float | None:
        if self.G <= 0 or self.A <= 0:
            return None
        return float((self.a * self.A / (self.beta * self.G)) ** (1 / (self.a + self.beta)))


def fit_curve(e: np.ndarray, loss: np.ndarray) -> CurveFit | None:
    """Least squares over the exponent grid (amplitudes ≥ 0 in closed form), refined on a finer grid."""
    best = _grid_fit(e, loss, A_GRID, BETA_GRID)
    if best is None:
        return None
    a_fine = np.clip(best.a * np.geomspace(0.8, 1.25, 7), A_GRID[0], A_GRID[-1])
    b_fine = np.clip(best.beta * np.geomspace(0.8, 1.25, 7), BETA_GRID[0], BETA_GRID[-1])
    return _grid_fit(e, loss, a_fine, b_fine) or best


def _grid_fit(e: np.ndarray, loss: np.ndarray, a_grid: np.ndarray, b_grid: np.ndarray) -> CurveFit | None:
    """Every grid point at once: the non-negative least squares of (C, A, G) for three columns is the best
    feasible least-squares solution over the seven subsets of columns (exact, no iterations)."""
    log_e = np.log(e)
    down = np.exp(-np.outer(a_grid, log_e))[:, None, :].repeat(len(b_grid), 1)  # [a, b, n]
    up = np.exp(np.outer(b_grid, log_e))[None, :, :].repeat(len(a_grid), 0)
    ones = np.ones_like(down)
    candidates = []
    for slots in ([0, 1, 2], [0, 1], [0, 2], [1, 2], [0], [1], [2]):
        cols = [(ones, down, up)[k] for k in slots]
        x = np.stack(cols, -1)  # [a, b, n, k]
        gram = x.transpose(0, 1, 3, 2) @ x + 1e-12 * np.eye(len(cols))
        coef = np.linalg.solve(gram, (x.transpose(0, 1, 3, 2) @ loss)[..., None])[..., 0]
        sse = ((x @ coef[..., None])[..., 0] - loss) ** 2
        ok = (coef >= 0).all(-1)
        full = np.zeros(coef.shape[:2] + (3,))
        full[..., slots] = coef
        candidates.append((np.where(ok & np.isfinite(sse.sum(-1)), sse.sum(-1), np.inf), full))
    sse = np.stack([c[0] for c in candidates])  # [set, a, b]
    if not np.isfinite(sse).any():
        return None
    k, i, j = np.unravel_index(int(np.argmin(sse)), sse.shape)
    c, amp, gap = candidates[k][1][i, j]
    return CurveFit(float(c), float(amp), float(a_grid[i]), float(gap), float(b_grid[j]),
                    float(math.sqrt(sse[k, i, j] / len(e))))


@dataclass(frozen=True)
class RunPlan:
    """What the job's mixture plan says about one repeated source (the engine's exact counts)."""

    plan: MixturePlan
    source: int  # index of the repeated source
    chunks: int  # its sequences per epoch
    seq_len: int
    total_steps: int
    first_changeable: int  # earliest step a schedule change can take effect

    def repetitions(self, step: int) -> float:
        """Epochs of the source served through ``step`` (E)."""
        return self.plan.realized_one(step + 1, self.source) / self.chunks

    def tokens(self, step: int) -> int:
        """Tokens of every source through ``step``."""
        return self.plan.batch_size * (step + 1) * self.seq_len

    def web_tokens(self, step: int) -> int:
        """Tokens of every other source through ``step``."""
        n = self.plan.batch_size * (step + 1) - self.plan.realized_one(step + 1, self.source)
        return n * self.seq_len

    def weights_at(self, step: int) -> tuple[Fraction, ...]:
        pieces = self.plan.pieces
        i = max(j for j, p in enumerate(pieces) if p.start <= step)
        p = pieces[i]
        return tuple(w + s * (step - p.start) for w, s in zip(p.w0, p.slope, strict=True))

    def step_reaching(self, e: float) -> int | None:
        """First step whose batch takes the source past ``e`` epochs, if before the end."""
        return self.plan.first_step_exceeding(self.source, math.floor(e * self.chunks), self.total_steps)


@dataclass(frozen=True)
class Proposal:
    """A schedule change: the repeated source at ``delta`` from ``start_step`` (a ramp reaches it at the
    end), with the predicted final losses with and without it."""

    kind: str  # "step" or "ramp"
    start_step: int
    from_delta: float  # the source's weight at ``start_step`` under the current schedule
    delta: float
    final_repetitions: float
    predicted_final_loss: float
    baseline_final_loss: float
    predicted_web_change: float | None  # predicted final web loss minus the baseline's (None: no web curve;
    #                                     then only changes that do not raise δ are proposed)
    schedule: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Forecast:
    forecast_id: str
    source: str
    points: int
    last_step: int
    repetitions_now: float
    fit: CurveFit | None
    turn_up_repetitions: float | None
    turn_up_step: int | None  # first step past E* under the current schedule (None: not before the end)
    interval: tuple[int | None, int | None]  # 5%–95% of the bootstrap refits' turn-up steps (None: never)
    share_turning_up: float  # bootstrap refits that turn up before the end
    excess_at_end: float  # predicted loss at the last step above the minimum (what overfitting costs)
    steps_to_overfit: float  # turn_up_step − last_step; inf when no turn-up is forecast
    warning: bool
    proposal: Proposal | None
    max_web_loss_increase: float  # the web-loss bound the proposal was chosen under
    notes: list[str]
    curve: list[list[float]] = field(default_factory=list)  # [step, E, loss, low, high] over the job

    def to_dict(self) -> dict[str, Any]:
        body = asdict(self)
        body["steps_to_overfit"] = None if math.isinf(self.steps_to_overfit) else self.steps_to_overfit
        return body


def forecast(run: RunPlan, names: list[str], steps: np.ndarray, loss: np.ndarray,
             web: tuple[np.ndarray, np.ndarray] | None = None, law: OverfittingLaw | None = None, *,
             stamp: str = "", max_web_loss_increase: float = 0.01, seed: int = 0) -> Forecast:
    """Fit the domain curve of ``run`` (eval ``steps`` → held-out ``loss``) and forecast its turn-up.

    ``web``: the (steps, loss) eval curve of a non-repeated source, for the web-loss limit of proposals.
    ``law``: the law fitted across runs (``mixer plan spt``); proposals need its δ-dependence.
    ``stamp`` identifies the inputs (job, schedule version, curve) and seeds the forecast id.
    """
    source = names[run.source]
    e_all = np.array([run.repetitions(int(s)) for s in steps])
    keep = e_all > 0
    e, y, s = e_all[keep], np.asarray(loss, float)[keep], np.asarray(steps)[keep]
    last = int(s[-1]) if len(s) else -1
    e_now = float(e[-1]) if len(e) else 0.0
    fid = hashlib.sha256(f"{stamp}|{len(s)}|{last}".encode()).hexdigest()[:16]
    if len(e) < MIN_POINTS or len(np.unique(e)) < 4:
        return Forecast(fid, source, int(len(e)), last, e_now, None, None, None, (None, None), 0.0, 0.0,
                        math.inf, False, None, max_web_loss_increase,
                        [f"need {MIN_POINTS} evals of {source!r} after its first sequences to forecast"])
    now = _assess(run, e, y, last, seed)
    fit, turn_e, turn_step, refits, boot = now.fit, now.turn_e, now.turn_step, now.refits, now.boot
    share, excess = now.share, now.excess
    interval = (_quantile(boot, 0.05), _quantile(boot, 0.95))
    # A warning must hold on two consecutive evals: the fit without the newest point warns too.
    warning = now.warning and len(e) > MIN_POINTS and _assess(run, e[:-1], y[:-1], int(s[-2]), seed).warning
    to_overfit = math.inf if turn_step is None else float(turn_step - last)
    notes = [] if fit.G > 0 else ["no repetition term in the fit: the curve shows no sign of overfitting"]
    proposal = None
    if law is None:
        notes.append("no law attached (PUT .../forecast/law with `mixer plan spt --json`'s law): no proposal")
    else:
        web_fit = _web_fit(run, web) if web is not None else None
        if web_fit is None:
            notes.append(f"fewer than {MIN_POINTS} web evals: the web-loss cost of raising the domain share "
                         "cannot be bounded, so only changes that lower it are proposed")
        calibrated = Calibrated.of(law, run, s, y)
        ceiling = PLAUSIBLE_FACTOR * float(y.max())
        baseline = calibrated.final_loss(run, run.repetitions(run.total_steps - 1))
        if not 0 <= baseline <= ceiling:
            notes.append(f"the law predicts a final domain loss of {baseline:.4g} for the current schedule, "
                         f"outside [0, {ceiling:.4g}]: it is read outside its regime, so no proposal")
        else:
            # On a warning the run's own curve says more repetitions hurt: the cross-run law may choose how
            # far and when to lower δ, not overrule that direction.
            proposal = _propose(run, names, calibrated, web_fit, max_web_loss_increase, ceiling,
                                may_raise=not warning)
    return Forecast(fid, source, int(len(e)), last, e_now, fit, turn_e, turn_step, interval, share,
                    excess, to_overfit, warning, proposal, max_web_loss_increase, notes,
                    _curve(run, fit, refits))


@dataclass(frozen=True)
class _Assessment:
    fit: CurveFit
    turn_e: float | None
    turn_step: int | None
    refits: list[CurveFit]
    boot: list[int | None]
    share: float
    excess: float
    warning: bool


def _assess(run: RunPlan, e: np.ndarray, y: np.ndarray, last: int, seed: int) -> _Assessment:
    """The fit, its turn-up, the bootstrap, and whether those alone make a warning."""
    fit = fit_curve(e, y)
    assert fit is not None  # the grid always holds a solvable point
    turn_e = fit.turn_e
    turn_step = _turn_step(run, turn_e, last)
    refits = _bootstrap(e, y, seed)
    boot = [_turn_step(run, f.turn_e, last) for f in refits] or [None]
    share = sum(b is not None for b in boot) / len(boot)
    e_end = run.repetitions(run.total_steps - 1)
    excess = float(fit.loss(e_end) - fit.loss(turn_e)) if turn_e is not None and turn_e < e_end else 0.0
    warning = turn_step is not None and share >= WARN_SHARE and excess >= max(MIN_EXCESS, 2 * fit.rmse)
    return _Assessment(fit, turn_e, turn_step, refits, boot, share, excess, warning)


def _turn_step(run: RunPlan, turn_e: float | None, last: int) -> int | None:
    if turn_e is None:
        return None
    if turn_e <= run.repetitions(last):
        return last  # already past the minimum
    return run.step_reaching(turn_e)


def _bootstrap(e: np.ndarray, y: np.ndarray, seed: int) -> list[CurveFit]:
    """Refits on eval points drawn with replacement (a fixed number, each one grid fit)."""
    rng = np.random.default_rng(seed)
    out: list[CurveFit] = []
    for _ in range(N_BOOTSTRAP):
        idx = np.sort(rng.integers(0, len(e), len(e)))
        if len(np.unique(e[idx])) < 4:
            continue
        refit = _grid_fit(e[idx], y[idx], A_GRID, BETA_GRID)
        if refit is not None:
            out.append(refit)
    return out


def _curve(run: RunPlan, fit: CurveFit, refits: list[CurveFit], points: int = 64) -> list[list[float]]:
    """[step, E, forecast loss, 5%, 95% of the refits] on a grid of steps over the whole job."""
    out = []
    for step in np.unique(np.linspace(0, run.total_steps - 1, points).astype(int)):
        e = run.repetitions(int(step))
        if e > 0:
            band = [float(f.loss(e)) for f in refits] or [float(fit.loss(e))]
            out.append([int(step), e, float(fit.loss(e)), float(np.quantile(band, 0.05)),
                        float(np.quantile(band, 0.95))])
    return out


def _quantile(values: list[int | None], q: float) -> int | None:
    """Quantile of turn-up steps where "never" sorts after every step (so it can be an interval end)."""
    ordered = sorted(values, key=lambda v: math.inf if v is None else v)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _web_fit(run: RunPlan, web: tuple[np.ndarray, np.ndarray]) -> tuple[CurveFit, float] | None:
    """Web loss as C + A·W^(−a) in web tokens W, in units of the last web eval's W (G is forced to ~0)."""
    steps, loss = web
    if len(steps) < MIN_POINTS:
        return None
    w = np.array([run.web_tokens(int(s)) for s in steps], float)
    fitted = _grid_fit(w / w[-1], np.asarray(loss, float), A_GRID, np.array([1e-9]))
    return None if fitted is None else (fitted, float(w[-1]))


@dataclass(frozen=True)
class Calibrated:
    """The law across runs, calibrated on this run: ``L = c + L_train(T, δ̄) + g·L_gap(T, δ̄)``.

    δ̄ = domain tokens / tokens so far = E·|D| / T: the run is read as a constant-δ run at its average
    fraction, so the gap is a function of the repetitions E (and T). ``c`` and ``g`` absorb what the run
    does differently from the pilots (model, data, noise of the cross-run fit). Where the least-squares
    ``g`` comes out negative (a short, noisy curve), the pilots' gap is kept (``g = 1``): reading it as no
    gap at all would make the law call every extra repetition free, on a run that may have just warned.
    """

    law: OverfittingLaw
    domain_tokens: int
    c: float
    g: float

    @classmethod
    def of(cls, law: OverfittingLaw, run: RunPlan, steps: np.ndarray, loss: np.ndarray) -> Calibrated:
        domain_tokens = run.chunks * run.seq_len
        t = np.array([run.tokens(int(s)) for s in steps], float)
        d = np.array([run.repetitions(int(s)) for s in steps]) * domain_tokens / t
        train, gap = law.train_loss(t, d), law.gap(t, d)
        rest = np.asarray(loss, float) - train
        x = np.column_stack([np.ones_like(t), gap])
        c, g = np.linalg.lstsq(x, rest, rcond=None)[0]
        if not g >= 0:  # the evals cannot fix the gap's amplitude: keep the pilots' (g = 1), not none
            c, g = float((rest - gap).mean()), 1.0
        return cls(law, domain_tokens, float(c), float(g))

    def final_loss(self, run: RunPlan, e_final: float) -> float:
        t = run.tokens(run.total_steps - 1)
        d = e_final * self.domain_tokens / t
        return float(self.c + self.law.train_loss(t, d) + self.g * self.law.gap(t, d))


def _propose(run: RunPlan, names: list[str], model: Calibrated, web_fit: tuple[CurveFit, float] | None,
             max_web: float, ceiling: float, may_raise: bool = True) -> Proposal | None:
    """The candidate change with the lowest predicted final domain loss, below the current schedule's,
    whose predicted final web loss is at most ``max_web`` above the current schedule's.

    Web loss is read as a function of web tokens alone (``_web_fit``): a change moves it only by the web
    tokens it adds or takes away. Candidates that raise δ are skipped unless ``may_raise``, and without a
    web curve (their cost is unknown); so are those whose predicted loss is outside [0, ``ceiling``]."""
    end = run.total_steps - 1
    s0 = run.first_changeable
    if s0 > end:
        return None
    e_end = run.repetitions(end)
    base_loss = model.final_loss(run, e_end)
    per_step = run.plan.batch_size / run.chunks  # epochs per step at δ = 1
    best: Proposal | None = None
    for frac in START_FRACTIONS:
        start = s0 + int(frac * (end - s0))
        e_start = run.repetitions(start - 1) if start > 0 else 0.0
        delta0 = float(run.weights_at(start)[run.source])
        for factor in DELTA_FACTORS:
            delta = round(delta0 * factor, 6)
            if delta >= 1 or (factor > 1 and (web_fit is None or not may_raise)):
                continue
            for kind in ("step", "ramp"):
                mean_delta = delta if kind == "step" else (delta0 + delta) / 2
                e_final = e_start + mean_delta * per_step * (end - start + 1)
                predicted = model.final_loss(run, e_final)
                if not 0 <= predicted <= ceiling:
                    continue
                web_change = None
                if web_fit is not None:
                    curve, scale = web_fit
                    w_base = run.web_tokens(end)
                    w_new = w_base + (e_end - e_final) * run.chunks * run.seq_len
                    web_change = float(curve.loss(w_new / scale) - curve.loss(w_base / scale))
                    if web_change > max_web:
                        continue
                if predicted < base_loss and (best is None or predicted < best.predicted_final_loss):
                    best = Proposal(kind, start, delta0, delta, e_final, predicted, base_loss, web_change)
    if best is None:
        return None
    return Proposal(**{**asdict(best), "schedule": _schedule(run, names, best)})


def _schedule(run: RunPlan, names: list[str], p: Proposal) -> dict[str, Any]:
    """The change as a schedule document: current weights until ``start``, then the new ones (or a ramp to
    them at the last step); the other sources keep their proportions."""
    now = run.weights_at(p.start_step)
    rest = 1 - now[run.source]
    new_delta = Fraction(str(p.delta))
    new = [new_delta if k == run.source else (w * (1 - new_delta) / rest if rest else Fraction(0))
           for k, w in enumerate(now)]

    def doc(weights: list[Fraction] | tuple[Fraction, ...]) -> dict[str, str]:
        return {n: f"{w.numerator}/{w.denominator}" for n, w in zip(names, _on_grid(weights), strict=True)}

    phases: list[dict[str, Any]] = [{"start_step": 0, "weights": doc(now)}]
    if p.kind == "ramp":
        if p.start_step > 0:
            phases.append({"start_step": p.start_step, "weights": doc(now), "ramp": True})
        else:
            phases[0]["ramp"] = True
        phases.append({"start_step": run.total_steps - 1, "weights": doc(new)})
    elif p.start_step > 0:
        phases.append({"start_step": p.start_step, "weights": doc(new)})
    else:
        phases = [{"start_step": 0, "weights": doc(new)}]
    return {"phases": phases}


def _on_grid(weights: list[Fraction] | tuple[Fraction, ...], grid: int = 10**9) -> list[Fraction]:
    """Weights rounded to multiples of 1/grid that sum to exactly 1 (the largest absorbs the rounding):
    small exact fractions, as a schedule wants them."""
    rounded = [Fraction(round(w * grid), grid) for w in weights]
    big = max(range(len(rounded)), key=lambda k: rounded[k])
    rounded[big] += 1 - sum(rounded)
    return rounded


AUTO_AUTHOR = "overfitting-watch"  # the author of every schedule version the policy applies


@dataclass(frozen=True)
class WatchPolicy:
    """What the watch may do on its own for one job; off unless an operator turns it on.

    ``max_web_loss_increase`` bounds every proposal of the job (applied by hand or not). The others bound
    automatic applies: only on a warning, only a predicted final domain-loss gain of at least
    ``min_gain``, a change of the source's weight of at most ``max_weight_change`` (absolute), a
    predicted web-loss change known and within the bound, and no second automatic change until
    ``cooldown_evals`` evals at or after the last one's effective step (the watch must see the new
    schedule before judging it).
    """

    auto_apply: bool = False
    max_web_loss_increase: float = 0.01
    min_gain: float = 0.01
    max_weight_change: float = 0.1
    cooldown_evals: int = MIN_POINTS

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> WatchPolicy:
        return cls(**doc)


def auto_apply_refusal(policy: WatchPolicy, found: Forecast, last_auto_effective: int | None,
                       evals_since: int) -> str | None:
    """Why ``policy`` must not apply ``found``'s proposal now (None: it may).

    ``last_auto_effective``: effective step of the last version the policy applied (None: none yet);
    ``evals_since``: evals of the source at or after that step.
    """
    p = found.proposal
    if not policy.auto_apply:
        return "auto_apply is off"
    if not found.warning or p is None:
        return "no warning with a proposal"
    gain = p.baseline_final_loss - p.predicted_final_loss
    if gain < policy.min_gain:
        return f"predicted gain {gain:.4f} < min_gain {policy.min_gain:g}"
    if abs(p.delta - p.from_delta) > policy.max_weight_change + 1e-9:  # weights are on a 1e-9 grid
        return (f"weight change {p.from_delta:g} -> {p.delta:g} exceeds max_weight_change "
                f"{policy.max_weight_change:g}")
    if p.predicted_web_change is None:
        return "no web curve: the web-loss cost cannot be bounded"
    if p.predicted_web_change > policy.max_web_loss_increase:
        return (f"predicted web-loss change {p.predicted_web_change:.4f} > max_web_loss_increase "
                f"{policy.max_web_loss_increase:g}")
    if last_auto_effective is not None and evals_since < policy.cooldown_evals:
        return (f"cooldown: {evals_since} of {policy.cooldown_evals} evals since the last automatic change "
                f"(effective step {last_auto_effective})")
    return None
