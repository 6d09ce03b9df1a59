"""Tables, target checks and the plot, from the results the driver collected (no measuring here).

``results[store][(method, size)] = {"save": {...}, "load": {...}}`` with the fields :mod:`cases` returns;
``wan[method] = {"save": {...}, "load": {...}}`` at one size.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.stats import Spread, ratio_cell

MiB = 1024 * 1024
GiB = 1024 * MiB
REFERENCE = "ckptcloud"
NOT_ALTERNATIVES = {"ckptcloud", "ckptcloud-async", "local"}  # "the best alternative" excludes these


def _runs(row: dict, phase: str) -> list[dict]:
    """Per-round results of one phase of a row (a row without ``runs`` is one round: its medians)."""
    return [r[phase] for r in row["runs"]] if row.get("runs") else [row[phase]]


def spread(row: dict, phase: str, field: str = "s") -> Spread:
    """Median and range of ``field`` over the row's rounds."""
    return Spread.of(r[field] for r in _runs(row, phase))


def _ratio(value: float, ref: float) -> str:
    return f"{value / ref:.2f}" if ref > 0 else "-"


def store_table(rows: dict, sizes: list[int], methods: list[str]) -> str:
    """One line per method and size: times as median (min-max) over rounds, the rest as medians."""
    head = (
        "| method | size | save s | save xck | save MB/s | blocked s | save peak extra MiB | save mem xck "
        "| save client CPU s/GiB | server CPU s/GiB | load s | load xck | load MB/s | load peak extra (xckpt) "
        "| load client CPU s/GiB |"
    )
    lines = [head, "|" + "---|" * 15]
    for size in sizes:
        ref = rows.get((REFERENCE, size))
        for method in methods:
            r = rows.get((method, size))
            if r is None:
                continue
            save, load, mb, gib = r["save"], r["load"], size * MiB / 1e6, size * MiB / GiB
            base = ref or r
            ref_save = base["save"]
            save_s, load_s = spread(r, "save"), spread(r, "load")
            server = f"{save['server_cpu'] / gib:.1f}" if save.get("server_cpu") is not None else "-"
            lines.append(
                f"| {method} | {size} MiB | {save_s.show()} | {ratio_cell(save_s, spread(base, 'save'))} "
                f"| {mb / save['s']:.0f} | {save['blocked']:.2f} | {save['extra'] / MiB:.0f} "
                f"| {_ratio(max(save['extra'], MiB), max(ref_save['extra'], MiB))} | {save['cpu'] / gib:.2f} "
                f"| {server} | {load_s.show()} | {ratio_cell(load_s, spread(base, 'load'))} | {mb / load['s']:.0f} "
                f"| {load['extra'] / MiB:.0f} ({load['extra'] / (size * MiB):.2f}x) | {load['cpu'] / gib:.2f} |"
            )
    return "\n".join(lines)


def wan_table(wan: dict, size: int) -> str:
    """Times as median (min-max) over rounds; speed-ups over one naive stream."""
    lines = ["| method | save s | save MB/s | save xnaive | load s | load MB/s | load xnaive |", "|" + "---|" * 7]
    naive = wan.get("naive")
    mb = size * MiB / 1e6
    for method, r in wan.items():
        save, load = spread(r, "save"), spread(r, "load")
        lines.append(
            f"| {method} | {save.show(1)} | {mb / save.median:.0f} "
            f"| {ratio_cell(spread(naive, 'save'), save) if naive else '-'} | {load.show(1)} "
            f"| {mb / load.median:.0f} | {ratio_cell(spread(naive, 'load'), load) if naive else '-'} |"
        )
    return "\n".join(lines)


def targets(rows: dict, sizes: list[int], wan: dict | None, part_size: int, concurrency: int) -> list[dict]:
    """The issue's targets for S3, each with the measured value, whether it holds, and whether the two ranges a
    time ratio compares overlap (``noise``: the rounds do not rank the two)."""
    out: list[dict[str, Any]] = []

    def add(name: str, measured: float, limit: float, unit: str = "x", higher_is_better: bool = False,
            noise: bool = False) -> None:  # fmt: skip
        ok = measured >= limit if higher_is_better else measured <= limit
        out.append({"target": name, "measured": measured, "limit": limit, "unit": unit, "ok": ok, "noise": noise})

    def compare(name: str, ours: dict, theirs: dict, phase: str) -> None:
        mine, other = spread(ours, phase), spread(theirs, phase)
        noise = min(mine.n, other.n) > 1 and mine.overlaps(other)
        add(name, mine.median / other.median, 1.0, noise=noise)

    bound = (concurrency + 1) * part_size + 24 * MiB
    for size in sizes:
        ck = rows.get((REFERENCE, size))
        if ck is None:
            continue
        add(f"{size} MiB: save peak extra ≤ (c+1)xpart+24 MiB", ck["save"]["extra"] / MiB, bound / MiB, "MiB")
        alternatives = {m: r for (m, s), r in rows.items() if s == size and m not in NOT_ALTERNATIVES}
        if not alternatives:
            continue
        best_save = min(alternatives, key=lambda m: alternatives[m]["save"]["s"])
        best_load = min(alternatives, key=lambda m: alternatives[m]["load"]["s"])
        if size >= 256:
            compare(f"{size} MiB: save s ≤ best alternative ({best_save})", ck, alternatives[best_save], "save")
        compare(f"{size} MiB: load s ≤ best alternative ({best_load})", ck, alternatives[best_load], "load")
        add(f"{size} MiB: load peak extra ≤ 1.1x checkpoint", ck["load"]["extra"] / (size * MiB), 1.1)
        if "s3torchconnector" in alternatives:
            theirs = alternatives["s3torchconnector"]["save"]["cpu"]
            add(f"{size} MiB: save client CPU ≤ s3torchconnector's", ck["save"]["cpu"] / theirs, 1.0)
    if wan and "naive" in wan and "ckptcloud c=8" in wan:
        for phase in ("save", "load"):
            speedup = wan["naive"][phase]["s"] / wan["ckptcloud c=8"][phase]["s"]
            add(f"WAN: {phase} at max_concurrency=8 ≥ 5x naive", speedup, 5.0, higher_is_better=True)
    return out


def targets_table(checks: list[dict]) -> str:
    """One line per target: measured, limit, and yes / **no** / within noise."""
    lines = ["| target | measured | limit | holds |", "|---|---|---|---|"]
    for c in checks:
        unit = c["unit"]
        holds = "within noise" if c.get("noise") else "yes" if c["ok"] else "**no**"
        lines.append(f"| {c['target']} | {c['measured']:.2f} {unit} | {c['limit']:.2f} {unit} | {holds} |")
    return "\n".join(lines)


def plot(results: dict, wan: dict | None, wan_size: int, path: Path, title: str) -> None:
    """Throughput and peak extra memory against size, per method and store; the WAN bars in the last row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stores = [s for s in ("s3", "gcs", "azure") if results.get(s)]
    nrows = len(stores) + (1 if wan else 0)
    fig, axes = plt.subplots(nrows, 3, figsize=(16, 4.2 * nrows), squeeze=False)
    metrics = [("save MB/s", lambda r, s: s * MiB / 1e6 / r["save"]["s"]),
               ("load MB/s", lambda r, s: s * MiB / 1e6 / r["load"]["s"]),
               ("save peak extra MiB", lambda r, s: r["save"]["extra"] / MiB)]  # fmt: skip
    for row, store in enumerate(stores):
        rows = results[store]
        methods = list(dict.fromkeys(m for m, _ in rows))
        for col, (label, value) in enumerate(metrics):
            ax = axes[row][col]
            for method in methods:
                points = sorted((s, value(r, s)) for (m, s), r in rows.items() if m == method)
                style = "-o" if method.startswith("ckptcloud") else "--s" if method == "local" else ":^"
                ax.plot([p[0] for p in points], [p[1] for p in points], style, label=method,
                        linewidth=2.5 if method == REFERENCE else 1.2)  # fmt: skip
            ax.set_xscale("log", base=2)
            ax.set_xlabel("checkpoint MiB")
            ax.set_title(f"{store}: {label}")
            ax.grid(alpha=0.3)
            if label.startswith("save peak"):
                ax.set_yscale("symlog", linthresh=16)
        axes[row][0].legend(fontsize=8)
    if wan:
        names = list(wan)
        for col, phase in enumerate(("save", "load")):
            ax = axes[-1][col]
            values = [wan_size * MiB / 1e6 / wan[n][phase]["s"] for n in names]
            ax.bar(names, values, color=["tab:blue" if n.startswith("ckptcloud") else "tab:gray" for n in names])
            ax.set_title(f"WAN proxy, {wan_size} MiB: {phase} MB/s")
            ax.tick_params(axis="x", labelrotation=30, labelsize=8)
        axes[-1][2].axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
