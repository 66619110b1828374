"""Plot a training run's loss curve (and validation losses) from ``model_dir/metrics.jsonl`` to a PNG.

    python scripts/plot_metrics.py out/demo/run                 # writes out/demo/run/loss.png
    python scripts/plot_metrics.py out/demo/run --out curve.png --smooth 10

Needs matplotlib (``pip install matplotlib``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def read_metrics(path: str) -> list[dict]:
    """Rows of ``metrics.jsonl`` (``path`` is the file or the run directory holding it)."""
    if os.path.isdir(path):
        path = os.path.join(path, "metrics.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist: is this a gptj-jax training run directory?")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _smooth(values: list[float], window: int) -> list[float]:
    out, acc = [], []
    for v in values:
        acc.append(v)
        if len(acc) > window:
            acc.pop(0)
        out.append(sum(acc) / len(acc))
    return out


def plot(rows: list[dict], out: str, smooth: int = 1, title: str = "") -> str:
    """Write a PNG of training loss per step (raw, plus a moving average when ``smooth > 1``) and every
    ``val_<name>_loss`` series; returns ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    if not train:
        raise ValueError("no rows with 'loss' in the metrics: nothing to plot")
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    steps, losses = zip(*train)
    ax.plot(steps, losses, color="#9ecae1" if smooth > 1 else "#3182bd", lw=1, label="train loss")
    if smooth > 1:
        ax.plot(steps, _smooth(list(losses), smooth), color="#3182bd", lw=2, label=f"train loss ({smooth}-step mean)")
    names = sorted({k[4:-5] for r in rows for k in r if k.startswith("val_") and k.endswith("_loss")})
    for name in names:
        pts = [(r["step"], r[f"val_{name}_loss"]) for r in rows if f"val_{name}_loss" in r]
        ax.plot(*zip(*pts), "o-", lw=2, label=f"val {name} loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross entropy (nats / token)")
    ax.set_title(title or "training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="training run directory (model_dir) or its metrics.jsonl")
    parser.add_argument("--out", default=None, help="PNG path (default: RUN/loss.png)")
    parser.add_argument("--smooth", type=int, default=1, help="moving-average window for the train loss")
    parser.add_argument("--title", default="", help="plot title")
    args = parser.parse_args(argv)
    run_dir = args.run if os.path.isdir(args.run) else os.path.dirname(args.run)
    out = args.out or os.path.join(run_dir, "loss.png")
    try:
        print(plot(read_metrics(args.run), out, args.smooth, args.title))
    except (FileNotFoundError, ValueError, ImportError) as e:
        print(f"plot_metrics: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
