"""How the cost of a training step scales with the number of active layers.

Layer stacking and layer dropping save compute only if a micro-batch with k of L layers active costs
about ``a + b k``: a fixed part (embeddings, head, loss, optimizer bookkeeping) plus k times the cost
of one layer. This script reads cost tables measured by ``train.py calibrate`` and reports, for
each, the least-squares line through the forward+backward times, the fixed share ``a / t(L)``, the
worst relative deviation from the line, and t(k) / t(L) against the naive k / L.

    python train.py calibrate --config configs/bert/demo.yaml --output /tmp/bert-demo.json
    python benchmarks/layer_cost.py /tmp/bert-demo.json configs/rst/bert-paper.json   # or python -m benchmarks.layer_cost
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def fit_line(ks: list[int], ts: list[float]) -> tuple[float, float]:
    n = len(ks)
    mean_k, mean_t = sum(ks) / n, sum(ts) / n
    slope = sum((k - mean_k) * (t - mean_t) for k, t in zip(ks, ts, strict=True)) / sum((k - mean_k) ** 2 for k in ks)
    return mean_t - slope * mean_k, slope


def report(path: str) -> str:
    table = json.loads(Path(path).read_text())
    ts = table["fwd_bwd_seconds"]
    ks = list(range(1, len(ts) + 1))
    big = len(ts)
    a, b = fit_line(ks, ts)
    worst = max(abs(t - (a + b * k)) / t for k, t in zip(ks, ts, strict=True))
    machine = table.get("machine") or {}
    device = machine.get("device", "?") if isinstance(machine, dict) else machine
    precision = machine.get("precision", "?") if isinstance(machine, dict) else "?"
    lines = [
        f"{path}: {device}, {precision}, micro-batch {table['micro_batch_size']} x {table['seq_len']} tokens",
        f"  t(k) = {a * 1e3:.3f} ms + k x {b * 1e3:.3f} ms; fixed share at L={big}: {a / ts[-1]:.1%}; "
        f"worst deviation from the line: {worst:.1%}",
        "   k   t(k) ms   t(k)/t(L)   k/L",
    ]
    for k, t in zip(ks, ts, strict=True):
        lines.append(f"  {k:2d} {t * 1e3:9.3f}   {t / ts[-1]:9.3f}   {k / big:5.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    paths = sys.argv[1:] if argv is None else argv
    if not paths:
        raise SystemExit(__doc__)
    print("\n\n".join(report(path) for path in paths))


if __name__ == "__main__":
    main()
