"""Fitting the parametric scaling law L(N, D) = E + A/N^α + B/D^β to ladder runs.

Method of Hoffmann et al. 2022 ("Training Compute-Optimal Large Language Models", Approach 3)
as re-done by Besiroglu et al. 2024 ("Chinchilla Scaling: A replication attempt"): minimise the
Huber loss (δ = 1e-3) of log-space residuals, with the prediction written in log-sum-exp form

    log L̂ = LSE(e, a − α·log N, b − β·log D),  E = eᵉ, A = eᵃ, B = eᵇ,

which keeps E, A, B positive without constraints and makes the objective well scaled. L-BFGS-B
is started from the best points of a grid of initialisations (evaluating the objective on the
whole grid is cheap and vectorised; the grid guards against the poor local minima the law has
when A/α and B/β trade off). Confidence intervals come from a bootstrap over runs.

N is non-embedding parameters and D training tokens; C ≈ 6·N·D is the law's compute convention.
Under the law the compute-optimal allocation has a closed form (minimise L subject to 6ND = C):

    G = (αA / (βB))^(1/(α+β)),  N* = G·(C/6)^(β/(α+β)),  D* = G⁻¹·(C/6)^(α/(α+β)).
"""

from __future__ import annotations

import itertools
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from spud.errors import SpudError

HUBER_DELTA = 1e-3


@dataclass
class ScalingLaw:
    E: float
    A: float
    B: float
    alpha: float
    beta: float
    source: str = ""
    samples: list[dict] = field(default_factory=list)  # bootstrap refits, {E, A, B, alpha, beta}
    # What N counts. Hoffmann et al. count all parameters; spud's ladder records non-embedding
    # parameters (Kaplan et al. 2020). Pearce & Song 2024 trace much of the Kaplan/Chinchilla
    # disagreement to exactly this, so a plan must match a model's N the way the law counted it.
    n_counts: str = "non_embedding"

    def loss(self, N, D):
        return self.E + self.A / np.power(N, self.alpha) + self.B / np.power(D, self.beta)

    @property
    def G(self) -> float:
        return (self.alpha * self.A / (self.beta * self.B)) ** (1.0 / (self.alpha + self.beta))

    def optimal(self, C: float) -> tuple[float, float]:
        """(N*, D*) minimising L(N, D) subject to 6·N·D = C (closed form, module doc)."""
        s = self.alpha + self.beta
        return self.G * (C / 6.0) ** (self.beta / s), (C / 6.0) ** (self.alpha / s) / self.G

    def tokens_for_loss(self, N, target: float):
        """D such that L(N, D) = target; inf where N alone cannot reach it."""
        gap = target - self.E - self.A / np.power(N, self.alpha)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            return np.where(gap > 0, np.power(self.B / np.maximum(gap, 1e-300), 1.0 / self.beta), np.inf)

    def params(self) -> dict:
        return {k: getattr(self, k) for k in ("E", "A", "B", "alpha", "beta")}

    def bootstrap_laws(self) -> list[ScalingLaw]:
        return [ScalingLaw(**s, n_counts=self.n_counts) for s in self.samples]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, path: str | Path) -> ScalingLaw:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise SpudError(f"cannot read scaling law {path}: {e}") from None
        law = data.get("law", data)
        try:
            return cls(**{k: law[k] for k in ("E", "A", "B", "alpha", "beta")},
                       source=law.get("source", str(path)), samples=law.get("samples", []),
                       n_counts=law.get("n_counts", "non_embedding"))
        except KeyError as e:
            raise SpudError(f"{path}: scaling law lacks {e}; expected E, A, B, alpha, beta") from None


# Published fits of the Chinchilla data. Besiroglu et al. 2024 (Table 1, their replication of
# Hoffmann et al.'s Approach 3 on the reconstructed data) is the default: Hoffmann et al. 2022's
# own constants (E=1.69, A=406.4, B=410.7, α=0.34, β=0.28) fit their data poorly and imply
# implausibly narrow intervals, as the replication shows.
CHINCHILLA = ScalingLaw(1.82, 482.01, 2085.43, 0.3478, 0.3658, source="Besiroglu et al. 2024", n_counts="total")
CHINCHILLA_HOFFMANN = ScalingLaw(1.69, 406.4, 410.7, 0.34, 0.28, source="Hoffmann et al. 2022", n_counts="total")


# --------------------------------------------------------------------------------- objective
def _objective(theta: np.ndarray, logN: np.ndarray, logD: np.ndarray, logL: np.ndarray, delta: float):
    """Summed Huber loss of log residuals and its analytic gradient; theta = (e, a, b, α, β)."""
    e, a, b, al, be = theta
    terms = np.stack([np.full(logN.size, e), a - al * logN, b - be * logD])
    m = terms.max(axis=0)
    w = np.exp(terms - m)
    r = m + np.log(w.sum(axis=0)) - logL
    absr = np.abs(r)
    huber = np.where(absr <= delta, 0.5 * r * r, delta * (absr - 0.5 * delta))
    dr = np.where(absr <= delta, r, delta * np.sign(r))  # d huber / d r
    p = w / w.sum(axis=0)  # softmax weights = d LSE / d term
    grad = np.array([
        (dr * p[0]).sum(),
        (dr * p[1]).sum(),
        (dr * p[2]).sum(),
        -(dr * p[1] * logN).sum(),
        -(dr * p[2] * logD).sum(),
    ])
    return huber.sum(), grad


def _grid() -> np.ndarray:
    """Initialisations: a coarser version of Hoffmann et al.'s grid (theirs has ~4.5k points)."""
    es = [-1.0, -0.5, 0.0, 0.5, 1.0]
    abs_ = [0.0, 5.0, 10.0, 15.0, 20.0, 25.0]
    exps = [0.1, 0.25, 0.4, 0.6, 1.0, 1.5]
    return np.array(list(itertools.product(es, abs_, abs_, exps, exps)), dtype=float)


BOUNDS = [(-10.0, 5.0), (-20.0, 60.0), (-20.0, 60.0), (1e-3, 3.0), (1e-3, 3.0)]


def _fit_from(starts: np.ndarray, logN, logD, logL, delta: float) -> np.ndarray:
    from scipy.optimize import minimize

    best, best_val = None, np.inf
    for x0 in starts:
        res = minimize(_objective, x0, args=(logN, logD, logL, delta), jac=True, method="L-BFGS-B",
                       bounds=BOUNDS, options={"maxiter": 500, "ftol": 1e-12, "gtol": 1e-10})
        if res.fun < best_val:
            best, best_val = res.x, res.fun
    return best


def _batch_values(grid: np.ndarray, logN, logD, logL, delta: float) -> np.ndarray:
    terms = np.stack([
        np.broadcast_to(grid[:, 0:1], (len(grid), logN.size)),
        grid[:, 1:2] - grid[:, 3:4] * logN,
        grid[:, 2:3] - grid[:, 4:5] * logD,
    ])
    m = terms.max(axis=0)
    r = m + np.log(np.exp(terms - m).sum(axis=0)) - logL
    absr = np.abs(r)
    return np.where(absr <= delta, 0.5 * r * r, delta * (absr - 0.5 * delta)).sum(axis=1)


def fit_law(N, D, L, delta: float = HUBER_DELTA, top_k: int = 6, bootstrap: int = 0,
            seed: int = 0, source: str = "fit") -> ScalingLaw:
    """Fit E, A, B, α, β to runs (N non-embedding params, D tokens, L final loss); see module doc.

    L-BFGS-B runs from the `top_k` best grid points. Each bootstrap resample (runs drawn with
    replacement) is refitted from the full-data optimum and the best grid point for it.
    """
    N, D, L = (np.asarray(x, dtype=float) for x in (N, D, L))
    if not (N.size == D.size == L.size) or N.size < 2:
        raise SpudError(f"need at least 2 runs with N, D and loss to fit a law, got {N.size}")
    if (N <= 0).any() or (D <= 0).any() or (L <= 0).any():
        raise SpudError("N, D and loss must all be positive to fit a law in log space")
    logN, logD, logL = np.log(N), np.log(D), np.log(L)
    grid = _grid()
    vals = _batch_values(grid, logN, logD, logL, delta)
    theta = _fit_from(grid[np.argsort(vals)[:top_k]], logN, logD, logL, delta)
    law = _to_law(theta, source)
    rng = np.random.default_rng(seed)
    for _ in range(bootstrap):
        idx = rng.integers(0, N.size, N.size)
        bN, bD, bL = logN[idx], logD[idx], logL[idx]
        v = _batch_values(grid, bN, bD, bL, delta)
        starts = np.vstack([theta[None], grid[np.argsort(v)[:1]]])
        law.samples.append(_to_law(_fit_from(starts, bN, bD, bL, delta), "").params())
    return law


def _to_law(theta: np.ndarray, source: str) -> ScalingLaw:
    e, a, b, al, be = (float(x) for x in theta)
    return ScalingLaw(float(np.exp(e)), float(np.exp(a)), float(np.exp(b)), al, be, source=source)


def intervals(law: ScalingLaw, q: tuple[float, float] = (2.5, 97.5)) -> dict[str, list[float]]:
    """Percentile bootstrap intervals of each parameter; empty without samples."""
    if not law.samples:
        return {}
    return {k: [float(np.percentile([s[k] for s in law.samples], x)) for x in q]
            for k in ("E", "A", "B", "alpha", "beta")}


def predict_interval(law: ScalingLaw, N: float, D: float, q=(2.5, 97.5)) -> list[float] | None:
    """Bootstrap percentile interval of the predicted loss at (N, D)."""
    if not law.samples:
        return None
    preds = [float(s.loss(N, D)) for s in law.bootstrap_laws()]
    return [float(np.percentile(preds, x)) for x in q]


# ------------------------------------------------------------------------------ ladder → fit
def read_ladder(path: str | Path) -> list[dict]:
    """Rows of a ladder.jsonl that have N, D and a finite loss (unfinished runs are skipped)."""
    p = Path(path)
    if p.is_dir():
        p = p / "ladder.jsonl"
    if not p.is_file():
        raise SpudError(f"ladder file not found: {p}")
    rows = []
    for line in p.read_text(encoding="utf-8").splitlines():
        try:
            r = json.loads(line)
        except ValueError:
            continue  # torn last line of an interrupted ladder
        if all(isinstance(r.get(k), (int, float)) for k in ("N", "D", "loss")) and np.isfinite(r["loss"]):
            rows.append(r)
    return rows


def frontier(law: ScalingLaw, budgets) -> list[dict]:
    out = []
    for C in budgets:
        n, d = law.optimal(float(C))
        out.append({"C": float(C), "N": float(n), "D": float(d), "loss": float(law.loss(n, d))})
    return out


def plot_fit(law: ScalingLaw, rows: list[dict], out_dir: Path) -> list[str]:
    """observed_vs_predicted.png, isoflop.png, frontier.png in out_dir; returns the paths."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and in tests
    import matplotlib.pyplot as plt

    N = np.array([r["N"] for r in rows], float)
    D = np.array([r["D"] for r in rows], float)
    L = np.array([r["loss"] for r in rows], float)
    C = 6 * N * D
    paths = []

    fig, ax = plt.subplots(figsize=(5, 5))
    pred = law.loss(N, D)
    sc = ax.scatter(pred, L, c=np.log10(C), cmap="viridis")
    lo, hi = min(pred.min(), L.min()), max(pred.max(), L.max())
    ax.plot([lo, hi], [lo, hi], "k--", lw=1)
    ax.set(xlabel="predicted loss", ylabel="observed loss", title="fit: observed vs predicted")
    fig.colorbar(sc, label="log10 C (6ND)")
    paths.append(_save(fig, out_dir / "observed_vs_predicted.png"))

    fig, ax = plt.subplots(figsize=(6, 4.5))
    budgets = np.logspace(np.log10(C.min()), np.log10(C.max()), 5) if C.max() > C.min() else [C[0]]
    for c in budgets:  # loss along iso-FLOP lines (6ND = c) as N varies
        n_opt, _ = law.optimal(c)
        ns = n_opt * np.logspace(-1.5, 1.5, 60)
        ax.plot(ns, law.loss(ns, c / (6 * ns)), label=f"C={c:.1e}")
        ax.plot([n_opt], [law.loss(n_opt, c / (6 * n_opt))], "k*")
    ax.scatter(N, L, c="k", s=12, label="runs")
    ax.set(xscale="log", xlabel="non-embedding params N", ylabel="loss", title="iso-FLOP curves")
    ax.legend(fontsize=7)
    paths.append(_save(fig, out_dir / "isoflop.png"))

    fig, ax = plt.subplots(figsize=(6, 4.5))
    cs = np.logspace(np.log10(C.min()) - 1, max(np.log10(C.max()) + 1, 24), 50)
    ns, ds = (np.array(x) for x in zip(*(law.optimal(c) for c in cs)))
    ax.plot(cs, ns, label="N* (params)")
    ax.plot(cs, ds, label="D* (tokens)")
    ax.scatter(C, N, s=10, c="C0")
    ax.scatter(C, D, s=10, c="C1")
    ax.set(xscale="log", yscale="log", xlabel="compute C = 6ND (FLOPs)", title="compute-optimal frontier")
    ax.legend()
    paths.append(_save(fig, out_dir / "frontier.png"))
    return paths


def _save(fig, path: Path) -> str:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def fit_cmd(ladder: str, out: str | None = None, bootstrap: int = 200) -> dict:
    """`spud fit LADDER [--out DIR] [--bootstrap N]`: fit the law to a ladder, write fit.json + plots."""
    from rich.table import Table

    from spud.ui import make_console

    rows = read_ladder(ladder)
    if len(rows) < 2:
        raise SpudError(f"{ladder}: need at least 2 finished runs to fit, found {len(rows)}")
    lp = Path(ladder)
    out_dir = Path(out) if out else (lp if lp.is_dir() else lp.parent) / "fit"
    out_dir.mkdir(parents=True, exist_ok=True)
    N, D, L = ([float(r[k]) for r in rows] for k in ("N", "D", "loss"))
    law = fit_law(N, D, L, bootstrap=bootstrap, source=f"fit of {ladder}")
    ci = intervals(law)
    pred = law.loss(np.array(N), np.array(D))
    runs = [{**{k: r.get(k) for k in ("name", "N", "D", "C", "loss")}, "predicted": float(p)}
            for r, p in zip(rows, pred)]
    budgets = [1e18, 1e19, 1e20, 1e21, 1e22, 1e23, 1e24]
    result = {
        "law": law.to_dict(),
        "intervals": ci,
        "n_runs": len(rows),
        "rmse_log": float(np.sqrt(np.mean((np.log(pred) - np.log(L)) ** 2))),
        "runs": runs,
        "frontier": frontier(law, budgets),
        "note": "few runs: parameters are poorly determined" if len(rows) < 10 else "",
    }
    (out_dir / "fit.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    result["plots"] = plot_fit(law, rows, out_dir)
    result["json"] = str(out_dir / "fit.json")

    console = make_console()
    t = Table(title=f"L(N, D) = E + A/N^α + B/D^β  ({len(rows)} runs, {bootstrap} bootstrap)")
    for c in ("param", "value", "95% CI"):
        t.add_column(c)
    for k, v in law.params().items():
        lo_hi = ci.get(k)
        t.add_row(k, f"{v:.4g}", f"[{lo_hi[0]:.4g}, {lo_hi[1]:.4g}]" if lo_hi else "-")
    console.print(t)
    f = Table(title="compute-optimal frontier under the fit (C = 6ND)")
    for c in ("C (FLOPs)", "N*", "D*", "D*/N*", "loss"):
        f.add_column(c, justify="right")
    for r in result["frontier"]:
        f.add_row(f"{r['C']:.0e}", f"{r['N']:.3g}", f"{r['D']:.3g}", f"{r['D'] / r['N']:.1f}", f"{r['loss']:.3f}")
    console.print(f)
    if result["note"]:
        console.print(f"[yellow]{result['note']}")
    console.print(f"wrote {result['json']} and {len(result['plots'])} plots in {out_dir}")
    return result
