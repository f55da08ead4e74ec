"""pytest-benchmark ``--benchmark-json`` output -> a markdown table and a bar chart (PNG).

Each benchmark of this repository's ``benchmarks/`` stores in ``extra_info``: ``impl`` (fastvit, eager_sdpa,
eager_naive, compiled, ...), ``images_per_s`` or ``tokens_per_s``, ``tflops`` (achieved, from exact FLOP
counts), ``mfu`` (when the device's peak is known) and ``device``. Rows are grouped by benchmark group; within a
group, every other implementation's row shows FastViT's speed-up over it (its mean time / FastViT's).
matplotlib is imported only when a chart is drawn.
"""

from __future__ import annotations

import json
from collections import OrderedDict


def load_benchmarks(path: str) -> list[dict]:
    """The ``benchmarks`` list of a pytest-benchmark JSON file.

    Raises:
        ValueError: the file is not pytest-benchmark JSON (no "benchmarks" list, or an entry without stats).
    """
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), list):
        raise ValueError(f"{path}: not pytest-benchmark --benchmark-json output (no 'benchmarks' list)")
    for b in data["benchmarks"]:
        if not isinstance(b.get("stats"), dict) or "mean" not in b["stats"]:
            raise ValueError(f"{path}: benchmark {b.get('name')!r} has no stats.mean")
    return data["benchmarks"]


def _impl(b: dict) -> str:
    return str(b.get("extra_info", {}).get("impl") or b.get("param") or b.get("name"))


def _groups(benchmarks: list[dict]) -> "OrderedDict[str, list[dict]]":
    groups: OrderedDict[str, list[dict]] = OrderedDict()
    for b in benchmarks:
        groups.setdefault(b.get("group") or "(no group)", []).append(b)
    return groups


def _rate(b: dict) -> tuple[str, float | None]:
    info = b.get("extra_info", {})
    for key, unit in (("images_per_s", "images/s"), ("tokens_per_s", "tokens/s")):
        if info.get(key) is not None:
            return unit, float(info[key])
    return "1/s", 1.0 / b["stats"]["mean"] if b["stats"]["mean"] > 0 else None


def _fastvit(rows: list[dict]) -> dict | None:
    return next((b for b in rows if _impl(b) == "fastvit"), None)


def markdown(benchmarks: list[dict]) -> str:
    """One markdown table per benchmark group: implementation, mean +- stddev (ms), throughput, TFLOP/s, MFU,
    FastViT's speed-up over that row's implementation."""
    out = []
    for group, rows in _groups(benchmarks).items():
        fast = _fastvit(rows)
        device = next((b.get("extra_info", {}).get("device") for b in rows if b.get("extra_info", {}).get("device")),
                      "")
        out += [f"### {group}" + (f" ({device})" if device else ""), "",
                "| implementation | mean (ms) | throughput | TFLOP/s | MFU | FastViT speed-up |",
                "|---|---|---|---|---|---|"]
        for b in sorted(rows, key=lambda r: r["stats"]["mean"]):
            st, info = b["stats"], b.get("extra_info", {})
            unit, rate = _rate(b)
            tf = info.get("tflops")
            mfu = info.get("mfu")
            if fast is None or b is fast:
                speed = "-"
            else:
                speed = f"{st['mean'] / fast['stats']['mean']:.2f}x"
            out.append(f"| {_impl(b)} | {st['mean'] * 1e3:.3f} ± {st.get('stddev', 0.0) * 1e3:.3f} | "
                       f"{'-' if rate is None else f'{rate:,.1f} {unit}'} | {'-' if tf is None else f'{tf:.3g}'} | "
                       f"{'-' if mfu is None else f'{mfu:.1%}'} | {speed} |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def bar_chart(benchmarks: list[dict], png_path: str) -> str:
    """Horizontal bars of each group's throughput per implementation (FastViT highlighted); writes ``png_path``
    and returns it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = _groups(benchmarks)
    heights = [max(1.2, 0.45 * len(rows) + 0.8) for rows in groups.values()]
    fig, axes = plt.subplots(len(groups), 1, figsize=(9, sum(heights)), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    for ax, (group, rows) in zip(axes[:, 0], groups.items()):
        rows = sorted(rows, key=lambda r: _impl(r))
        unit = _rate(rows[0])[0]
        vals = [_rate(b)[1] or 0.0 for b in rows]
        names = [_impl(b) for b in rows]
        colors = ["tab:orange" if n == "fastvit" else "tab:blue" for n in names]
        ax.barh(names, vals, color=colors)
        ax.set_title(group, fontsize=9)
        ax.set_xlabel(unit, fontsize=8)
        ax.tick_params(labelsize=8)
        for y, v in enumerate(vals):
            ax.text(v, y, f" {v:,.0f}", va="center", fontsize=7)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return png_path
