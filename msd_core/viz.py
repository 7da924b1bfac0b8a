"""Figures: training curves, embedding maps, similarity heatmaps, and the retrieval explorer.

Every function returns a ``matplotlib.figure.Figure`` built without pyplot's global
state, so the library works the same in scripts, tests and notebooks (where a returned
figure is displayed by Jupyter).
"""

from __future__ import annotations

from typing import Any

import pandas as pd
from matplotlib.figure import Figure


def plot_history(history: Any, *, smooth: int = 10) -> Figure:
    """Plot the loss (raw and moving average), the temperature, alpha and the learning rate.

    Args:
        history: a ``msd_core.train.History``, a DataFrame of its records, or a path to
            its ``history.csv``.
        smooth: window of the moving average, in optimizer steps.
    """
    frame = _history_frame(history)
    figure = Figure(figsize=(11, 3.2), layout="constrained")
    loss_axis, tau_axis, schedule_axis = figure.subplots(1, 3)

    loss_axis.plot(frame["step"], frame["loss"], color="tab:blue", alpha=0.35, label="loss")
    window = max(1, min(smooth, len(frame) // 3 or 1))
    loss_axis.plot(frame["step"], frame["loss"].rolling(window, min_periods=1).mean(), color="tab:blue",
                   label=f"mean of {window} steps")
    loss_axis.set(title="training loss", xlabel="optimizer step", ylabel="loss")
    loss_axis.legend()

    tau_axis.plot(frame["step"], frame["tau"], color="tab:red")
    tau_axis.set(title="temperature tau", xlabel="optimizer step")

    schedule_axis.plot(frame["step"], frame["alpha"], color="tab:green", label="alpha")
    schedule_axis.set(title="alpha and learning rate", xlabel="optimizer step", ylabel="alpha")
    lr_axis = schedule_axis.twinx()
    lr_axis.plot(frame["step"], frame["lr"], color="tab:gray", linestyle="--", label="lr")
    lr_axis.set_ylabel("learning rate")
    lines = schedule_axis.get_lines() + lr_axis.get_lines()
    schedule_axis.legend(lines, [line.get_label() for line in lines], loc="center right")
    return figure


def _history_frame(history: Any) -> pd.DataFrame:
    if isinstance(history, pd.DataFrame):
        frame = history
    elif hasattr(history, "to_frame"):
        frame = history.to_frame()
    else:
        frame = pd.read_csv(history)
    if frame.empty:
        raise ValueError("the history is empty: train for at least one step before plotting")
    return frame
