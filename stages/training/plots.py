"""loss.png: the training loss per logged step and the validation loss of a run."""

from __future__ import annotations

from pathlib import Path


def save_loss_plot(history: list[dict], evals: list[dict], before, after, path: Path) -> None:
    """loss_figure as a PNG at path; without matplotlib's version in its metadata, so the file's
    bytes do not change with the library."""
    import matplotlib.pyplot as plt

    fig = loss_figure(history, evals, before, after)
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)


def loss_figure(history: list[dict], evals: list[dict], before, after):
    """The training loss per logged step and the validation loss: a curve through the evaluation
    before training, the scheduled ones and the final one; two points when none were scheduled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot([h["step"] for h in history], [h["loss"] for h in history], marker="o", ms=3, label="train loss")
    points = ([(0, before)] if before is not None else []) + [(e["step"], e["eval_loss"]) for e in evals]
    if after is not None and history and (not points or points[-1][0] != history[-1]["step"]):
        points.append((history[-1]["step"], after))
    if len(points) > 2 or (evals and points):
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="s", ms=4, color="tab:red", label="eval loss")
    elif points:
        ax.scatter([p[0] for p in points], [p[1] for p in points], color="tab:red", zorder=3, label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig
