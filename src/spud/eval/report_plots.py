"""The report's PNG plots: loss, bpb, learning rate, throughput, scores and the data mix."""

from __future__ import annotations

from pathlib import Path

from spud.eval.report_inputs import _num


def _figure(ncols: int = 1):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.2 * ncols, 3.4), dpi=100)
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    return fig, axes


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path.name


def _series(rows: list[dict], field: str, x: str = "step") -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in rows:
        xv, yv = _num(r.get(x)), _num(r.get(field))
        if xv is not None and yv is not None:
            xs.append(xv)
            ys.append(yv)
    return xs, ys


def _val_with_tokens(train: list[dict], val: list[dict]) -> list[dict]:
    """val records carry how many tokens they evaluated, not how many had been trained on:
    attach the training tokens seen at that step (0 before the first step)."""
    seen = {r.get("step"): _num(r.get("tokens")) for r in train}
    return [r | {"trained_tokens": seen.get(r.get("step"), 0.0 if r.get("step") == 0 else None)}
            for r in val]


def plot_loss(train, val, out: Path) -> str | None:
    val_t = _val_with_tokens(train, val)
    if not (_series(train, "loss")[0] or _series(val, "loss")[0]):
        return None
    fig, (a, b) = _figure(2)
    for ax, xt, xv, label in ((a, "step", "step", "step"), (b, "tokens", "trained_tokens", "tokens seen")):
        x, y = _series(train, "loss", xt)
        if x:
            ax.plot(x, y, label="train loss", lw=1)
        x, y = _series(val_t, "loss", xv)
        if x:
            ax.plot(x, y, "o-", label="val loss", ms=3)
        ax.set_xlabel(label)
        ax.set_ylabel("loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend()
    return _save(fig, out / "loss.png")


def plot_bpb(train, val, out: Path) -> str | None:
    val_t = _val_with_tokens(train, val)
    if not _series(val, "bpb")[0]:
        return None
    fig, (a, b) = _figure(2)
    for ax, xv, label in ((a, "step", "step"), (b, "trained_tokens", "tokens seen")):
        x, y = _series(val_t, "bpb", xv)
        ax.plot(x, y, "o-", ms=3, color="tab:green")
        ax.set_xlabel(label)
        ax.set_ylabel("val bits per byte")
        ax.grid(alpha=0.3)
    return _save(fig, out / "bpb.png")


def plot_lr(train, out: Path) -> str | None:
    x, y = _series(train, "lr")
    if not x:
        return None
    fig, (a,) = _figure(1)
    a.plot(x, y, color="tab:purple")
    a.set_xlabel("step")
    a.set_ylabel("learning rate")
    a.grid(alpha=0.3)
    return _save(fig, out / "lr.png")


def plot_throughput(train, out: Path) -> str | None:
    x, y = _series(train, "tokens_per_s")
    if not x:
        return None
    fig, (a, b) = _figure(2)
    a.plot(x, y, lw=1)
    a.set_xlabel("step")
    a.set_ylabel("tokens/s")
    a.grid(alpha=0.3)
    x, y = _series(train, "mfu")
    if x:
        b.plot(x, [v * 100 for v in y], lw=1, color="tab:orange")
    b.set_xlabel("step")
    b.set_ylabel("MFU (%)")
    b.grid(alpha=0.3)
    return _save(fig, out / "throughput.png")


def plot_evals(evals: list[dict], out: Path) -> str | None:
    per_task: dict[str, tuple[list, list]] = {}
    for i, r in enumerate(evals):
        x = r["_step"] if r["_step"] is not None else i
        for name, t in (r.get("tasks") or {}).items():
            v = _num(t.get("value")) if isinstance(t, dict) else None
            if v is not None:
                xs, ys = per_task.setdefault(f"{r['_model']}: {name} ({t.get('metric', '?')})", ([], []))
                xs.append(x)
                ys.append(v)
    if not per_task:
        return None
    fig, (a,) = _figure(1)
    fig.set_size_inches(7, 3.8)
    for label, (xs, ys) in sorted(per_task.items()):
        a.plot(xs, ys, "o-", ms=4, label=label)
    a.set_xlabel("checkpoint step")
    a.set_ylabel("score")
    a.set_ylim(-0.02, 1.02)
    a.grid(alpha=0.3)
    a.legend(fontsize=7)
    return _save(fig, out / "eval.png")


def plot_data_mix(sources: list[dict], out: Path) -> str | None:
    names = [str(s.get("name", "?")) for s in sources]
    train = [_num(s.get("train_tokens")) or 0.0 for s in sources]
    val = [_num(s.get("val_tokens")) or 0.0 for s in sources]
    if not names or not any(train) and not any(val):
        return None
    fig, (a,) = _figure(1)
    fig.set_size_inches(max(5.0, 1.1 * len(names) + 2), 3.6)
    xs = range(len(names))
    a.bar(xs, train, label="train")
    a.bar(xs, val, bottom=train, label="val")
    a.set_xticks(list(xs))
    a.set_xticklabels(names, rotation=20, ha="right", fontsize=8)
    a.set_ylabel("tokens")
    a.legend()
    a.grid(alpha=0.3, axis="y")
    return _save(fig, out / "data_mix.png")
