"""The benchmark's report: ratios to ckptcloud, target checks that can fail, and a plot file."""

from __future__ import annotations

from benchmarks import report

MiB = report.MiB


def _case(save_s: float, load_s: float, save_extra_mib: float, load_extra_mib: float, cpu: float = 1.0) -> dict:
    save = {"s": save_s, "blocked": save_s, "extra": save_extra_mib * MiB, "cpu": cpu, "server_cpu": 2.0}
    return {"save": save, "load": {"s": load_s, "extra": load_extra_mib * MiB, "cpu": cpu, "server_cpu": 1.0}}


ROWS = {
    ("ckptcloud", 256): _case(2.0, 1.0, 150, 300, cpu=0.3),
    ("naive", 256): _case(4.0, 0.5, 256, 512, cpu=0.6),
    ("s3torchconnector", 256): _case(1.0, 2.0, 300, 600, cpu=0.4),
    ("local", 256): _case(0.2, 0.1, 0, 256),
}
WAN = {"naive": _case(20.0, 20.0, 256, 512), "ckptcloud c=8": _case(3.0, 5.0, 150, 260)}


def test_the_table_shows_each_method_relative_to_ckptcloud():
    table = report.store_table(ROWS, [256], ["ckptcloud", "naive", "s3torchconnector", "local"])
    naive = next(line for line in table.splitlines() if line.startswith("| naive "))
    cells = [c.strip() for c in naive.split("|")[1:-1]]
    assert cells[2:4] == ["4.00", "2.00"]  # save s and its ratio to ckptcloud's 2.0 s
    assert cells[4] == f"{256 * MiB / 1e6 / 4.0:.0f}"  # MB/s
    assert cells[10:12] == ["0.50", "0.50"]  # load s and its ratio
    assert cells[13] == "512 (2.00x)"


def test_targets_compare_with_the_best_alternative_and_flag_misses():
    checks = {c["target"]: c for c in report.targets(ROWS, [256], WAN, part_size=16 * MiB, concurrency=8)}
    save = checks["256 MiB: save s ≤ best alternative (s3torchconnector)"]
    assert save["measured"] == 2.0 and not save["ok"]  # local is the limit, not an alternative
    load = checks["256 MiB: load s ≤ best alternative (naive)"]
    assert load["measured"] == 2.0 and not load["ok"]
    assert checks["256 MiB: save peak extra ≤ (c+1)xpart+24 MiB"]["ok"]  # 150 ≤ 168
    assert not checks["256 MiB: load peak extra ≤ 1.1x checkpoint"]["ok"]  # 300/256 = 1.17
    assert checks["256 MiB: save client CPU ≤ s3torchconnector's"]["measured"] == 0.3 / 0.4
    wan_save = checks["WAN: save at max_concurrency=8 ≥ 5x naive"]
    assert wan_save["ok"] and round(wan_save["measured"], 2) == 6.67
    assert not checks["WAN: load at max_concurrency=8 ≥ 5x naive"]["ok"]  # 4x
    assert "**no**" in report.targets_table(list(checks.values()))


def test_the_plot_is_written_as_a_png(tmp_path):
    path = tmp_path / "bench.png"
    report.plot({"s3": ROWS}, WAN, 256, path, "test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _rounds(*cases: dict) -> dict:
    """A row measured over several rounds, as the driver summarizes it."""
    from benchmarks.bench import summarize

    return summarize(list(cases))


def test_times_show_median_and_range_and_overlapping_ranges_are_marked_noise():
    rows = {
        ("ckptcloud", 256): _rounds(_case(2.0, 1.0, 150, 300), _case(2.2, 1.1, 150, 300), _case(2.1, 0.9, 150, 300)),
        ("naive", 256): _rounds(_case(2.3, 3.0, 256, 512), _case(2.05, 3.1, 256, 512), _case(2.6, 2.9, 256, 512)),
    }
    table = report.store_table(rows, [256], ["ckptcloud", "naive"])
    naive = next(line for line in table.splitlines() if line.startswith("| naive "))
    cells = [c.strip() for c in naive.split("|")[1:-1]]
    assert cells[2] == "2.30 (2.05-2.60)"  # median (min-max) of the three rounds
    assert cells[3] == "1.10 (noise)"  # 2.05-2.60 overlaps ckptcloud's 2.00-2.20: no ranking
    assert cells[10:12] == ["3.00 (2.90-3.10)", "3.00"]  # load ranges apart: a ranking
    checks = {c["target"]: c for c in report.targets(rows, [256], None, part_size=16 * MiB, concurrency=8)}
    save = checks["256 MiB: save s ≤ best alternative (naive)"]
    assert save["noise"] and save["ok"]  # 2.1 / 2.3 holds by the medians, but the rounds do not rank them
    assert "within noise" in report.targets_table([save])
    load = checks["256 MiB: load s ≤ best alternative (naive)"]
    assert load["ok"] and not load["noise"]
