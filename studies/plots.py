"""The pictures of a study's report: loss against RST per method, the downstream average, TensorBoard's HParams."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from core.durations import parse_duration
from studies.study import Study, slug

__all__ = ["downstream_average", "scalar_curves", "write_hparams", "write_plots"]


def downstream_average(row: dict[str, Any]) -> float | None:
    """A run's downstream average score, if it was evaluated."""
    return (row.get("downstream") or {}).get("average")


def scalar_curves(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar TensorBoard logged for a run: tag -> [(step, value)], one value per step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    curves = {}
    for tag in events.Tags()["scalars"]:
        by_step = {e.step: e.value for e in events.Scalars(tag)}  # a resumed run re-logs some steps: keep the last
        curves[tag] = sorted(by_step.items())
    return curves


def write_plots(study: Study, rows: list[dict[str, Any]], out: Path) -> list[str]:
    """val_loss_vs_rst.png, train_loss_vs_rst.png (mean over seeds, min-max band), downstream.png (bars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    done = [r for r in rows if r["status"] == "done"]
    for tag, file_name, title in (("val/loss", "val_loss_vs_rst.png", "validation loss"),
                                  ("train/loss", "train_loss_vs_rst.png", "training loss")):
        figure, axes = plt.subplots(1, len(study.budgets), figsize=(6 * len(study.budgets), 4), squeeze=False)
        for axis, budget in zip(axes[0], study.budgets, strict=True):
            by_variant: dict[str, list[list[tuple[float, float]]]] = {}
            for r in (r for r in done if r["budget"] == budget):
                curves = scalar_curves(r["run"].log_dir)
                rst = dict(curves.get("rst/seconds", []))
                points = [(_rst_at(rst, step), value) for step, value in curves.get(tag, [])]
                if points:
                    by_variant.setdefault(r["variant"], []).append(points)
            for variant, series in sorted(by_variant.items()):
                length = min(len(s) for s in series)
                xs = [statistics.fmean(s[i][0] for s in series) for i in range(length)]
                ys = [[s[i][1] for s in series] for i in range(length)]
                mean = [statistics.fmean(v) for v in ys]
                line, = axis.plot(xs, mean, label=variant)
                if len(series) > 1:
                    axis.fill_between(xs, [min(v) for v in ys], [max(v) for v in ys], alpha=0.2, color=line.get_color())
            axis.set_title(f"{title}, budget {budget}")
            axis.set_xlabel("RST seconds")
            axis.set_ylabel(title)
            if by_variant:
                axis.legend(fontsize=8)
        figure.tight_layout()
        figure.savefig(out / file_name, dpi=100)
        plt.close(figure)
        written.append(file_name)
    scored = [r for r in done if downstream_average(r) is not None]
    if scored:
        figure, axis = plt.subplots(figsize=(7, 4))
        labels = sorted({(r["budget"], r["variant"]) for r in scored}, key=lambda k: (parse_duration(k[0]), k[1]))
        means = [statistics.fmean(downstream_average(r) for r in scored if (r["budget"], r["variant"]) == k)
                 for k in labels]
        axis.bar(range(len(labels)), means)
        axis.set_xticks(range(len(labels)), [f"{v}\n{b}" for b, v in labels], fontsize=8)
        axis.set_ylabel("downstream average (mean over seeds)")
        axis.set_ylim(min(means) - 5, max(means) + 2)
        figure.tight_layout()
        figure.savefig(out / "downstream.png", dpi=100)
        plt.close(figure)
        written.append("downstream.png")
    return written


def _rst_at(rst: dict[int, float], step: int) -> float:
    """RST seconds at ``step`` from the logged ``rst/seconds`` curve (nearest logged step at or before it)."""
    if step in rst:
        return rst[step]
    earlier = [s for s in rst if s <= step]
    return rst[max(earlier)] if earlier else 0.0


def write_hparams(study: Study, rows: list[dict[str, Any]], out: Path) -> None:
    """One HParams entry per finished run under ``<study>/hparams`` (TensorBoard's HParams dashboard)."""
    from torch.utils.tensorboard import SummaryWriter

    directory = out / "hparams"
    if directory.exists():
        import shutil

        shutil.rmtree(directory)
    for r in rows:
        if r["status"] != "done":
            continue
        hparams = {"method": r["method"], "variant": r["variant"], "budget": r["budget"], "seed": r["seed"],
                   **{k: (v if isinstance(v, int | float | str | bool) else str(v)) for k, v in (r.get("setting") or {}).items()}}
        metrics = {f"result/{k}": float(r[k]) for k in ("val_loss", "train_loss", "optimizer_steps", "wall_seconds")
                   if r.get(k) is not None}
        if downstream_average(r) is not None:
            metrics["result/downstream_average"] = float(downstream_average(r))
        with SummaryWriter(str(directory / slug(r["run"].run_id.replace("/", "_")))) as writer:
            writer.add_hparams(hparams, metrics, run_name=".")
