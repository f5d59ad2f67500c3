"""loss.png: the training loss per logged step and the validation loss of a run; for preference
and reward training a second panel with the reward metrics (accuracy, margin) per step."""

from __future__ import annotations

from pathlib import Path


def save_loss_plot(history: list[dict], evals: list[dict], before, after, path: Path, metrics: tuple[str, ...] = ()) -> None:
    """loss_figure as a PNG at path; without matplotlib's version in its metadata, so the file's
    bytes do not change with the library. `metrics`: keys of history (and `eval_` ones of evals)
    drawn in a second panel."""
    import matplotlib.pyplot as plt

    fig = loss_figure(history, evals, before, after)
    if any(k in h for h in history for k in metrics):
        metrics_panel(fig, history, evals, metrics)
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


def metrics_panel(fig, history: list[dict], evals: list[dict], metrics: tuple[str, ...]) -> None:
    """A panel under the loss: each metric per logged training step, and at each evaluation."""
    loss_axes = fig.axes[0]
    fig.set_size_inches(6, 6.5)
    grid = fig.add_gridspec(2, 1)
    loss_axes.set_subplotspec(grid[0])
    ax = fig.add_subplot(grid[1], sharex=loss_axes)
    for key in metrics:
        steps = [(h["step"], h[key]) for h in history if key in h]
        if steps:
            line, = ax.plot(*zip(*steps), marker="o", ms=3, label=key)
            held = [(e["step"], e[f"eval_{key}"]) for e in evals if f"eval_{key}" in e]
            if held:
                ax.plot(*zip(*held), marker="s", ms=4, ls="--", color=line.get_color(), label=f"eval {key}")
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
