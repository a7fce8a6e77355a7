"""The soak benchmark's report: the summary against the targets, the CSV and JSON files, the PNG (benchmarks.soak).

Targets (issue 12): after warm-up (the first `warmup_fraction` of the run) the broker's RSS stays within ±10% of
its median; the data directory stays within the backlog's bytes plus FEW_SEGMENTS segments.
Invariant: nothing here talks to the broker; it reads the samples only.
"""

from __future__ import annotations

import csv
import json
import os
import platform
import statistics
from pathlib import Path

MIB = 2**20
STALL_MS = 10.0  # issue 12: nothing holds the event loop for more than ~10 ms


def machine() -> dict:
    """nproc, the CPU model, the kernel and Python, for the figures' context."""
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "cpu": model, "kernel": platform.release(),
            "python": platform.python_version()}  # fmt: skip


def _values(rows: list[dict], key: str) -> list[float]:
    return [row[key] for row in rows if row.get(key) is not None]


def _rss_slope(rows: list[dict]) -> float | None:
    """Least-squares growth of RSS in MB per million messages published (None with too few points)."""
    points = [(row["published"], row["rss_mb"]) for row in rows]
    if len(points) < 3 or points[0][0] == points[-1][0]:
        return None
    slope, _ = statistics.linear_regression([p for p, _ in points], [r for _, r in points])
    return slope * 1e6


def stalls_over(rows: list[dict], part: str) -> int | None:
    """Of the intervals with a lag over STALL_MS, how many had that `part` of a lag over it too."""
    stalls = [row for row in rows if row["loop_lag_max_ms"] is not None and row["loop_lag_max_ms"] > STALL_MS]
    if any(row.get(part) is None for row in stalls):
        return None
    return sum(row[part] > STALL_MS for row in stalls)


def summarize(rows: list[dict], counters: dict, elapsed_s: float, warmup_fraction: float, segment_bytes: int,
              few_segments: int, rss_spread_target: float, lag_exported: bool) -> dict:  # fmt: skip
    """The run's figures and whether the targets are met, from the samples (at least two)."""
    end = rows[-1]["t_s"]
    warm = [row for row in rows if row["t_s"] >= warmup_fraction * end] or rows[-1:]
    rss = _values(warm, "rss_mb")
    median = statistics.median(rss)
    spread = max(median - min(rss), max(rss) - median) / median
    excess = [row["disk_bytes"] - row["backlog_bytes"] for row in warm]
    bound = few_segments * segment_bytes
    fsync_p99 = _values(rows[1:], "fsync_p99_ms")
    lag_p99, lag_max = _values(rows[1:], "loop_lag_p99_ms"), _values(rows[1:], "loop_lag_max_ms")
    return {
        "elapsed_s": round(elapsed_s, 1),
        "published": counters["published"],
        "acked": counters["acked"],
        "publish_rate": round(counters["published"] / max(elapsed_s, 1e-9)),
        "warmup_s": round(warmup_fraction * end, 1),
        "rss_start_mb": rows[0]["rss_mb"],
        "rss_end_mb": rows[-1]["rss_mb"],
        "rss_after_warmup_mb": {"min": min(rss), "median": median, "max": max(rss)},
        "rss_spread_pct": round(spread * 100, 1),
        "rss_growth_mb_per_million": _rss_slope(warm),
        "rss_target_met": spread <= rss_spread_target,
        "backlog_max": max(row["backlog"] for row in warm),
        "disk_max_bytes": max(row["disk_bytes"] for row in warm),
        "checkpoint_max_bytes": max(row["checkpoint_bytes"] for row in warm),
        "disk_over_backlog_max_bytes": max(excess),
        "disk_bound_bytes": bound,
        "disk_target_met": max(excess) <= bound,
        "fsync_p99_ms": {"median": statistics.median(fsync_p99), "max": max(fsync_p99)} if fsync_p99 else None,
        "fsync_max_bucket_ms": max(_values(rows[1:], "fsync_max_ms"), default=None),
        "loop_lag_exported": lag_exported,
        "loop_lag_p99_ms": {"median": statistics.median(lag_p99), "max": max(lag_p99)} if lag_p99 else None,
        "loop_lag_max_bucket_ms": max(lag_max, default=None),
        "loop_lag_stalls": sum(bound > STALL_MS for bound in lag_max),
        # of those intervals, the ones whose largest on-CPU part of a lag was also over the bound (the broker's own
        # holds) and those whose largest wait for a core was (the machine's); None from a broker without them
        "loop_lag_stalls_on_cpu": stalls_over(rows[1:], "loop_lag_on_cpu_max_ms"),
        "loop_lag_stalls_waiting": stalls_over(rows[1:], "loop_lag_waiting_max_ms"),
        "intervals": len(rows) - 1,
    }


def describe(summary: dict, counters: dict, queues: dict, few_segments: int, rss_spread_target: float) -> list[str]:
    """The summary as lines for a terminal (`queues`: the broker's counters per queue)."""
    s, rss = summary, summary["rss_after_warmup_mb"]

    def verdict(met: bool) -> str:
        return "met" if met else "MISSED"

    growth = s["rss_growth_mb_per_million"]
    lines = [
        f"ran {s['elapsed_s']:g} s: {s['published']:,} published ({s['publish_rate']:,} msg/s), {s['acked']:,} acked, "
        f"{counters['nacked']:,} nacked, {counters['dedup_repeats']:,} dedup repeats, {counters['errors']} errors"
        + (f" (first: {counters['first_error']})" if counters["errors"] else ""),
        f"RSS: {s['rss_start_mb']:.1f} MB at start, {s['rss_end_mb']:.1f} MB at the end; after warm-up "
        f"(t >= {s['warmup_s']:g} s) min {rss['min']:.1f} / median {rss['median']:.1f} / max {rss['max']:.1f} MB, "
        f"±{s['rss_spread_pct']:.1f}% around the median"
        + (f", trend {growth:+.1f} MB per million messages" if growth is not None else ""),
        f"  target ±{rss_spread_target * 100:g}% after warm-up: {verdict(s['rss_target_met'])}",
        f"disk: max {s['disk_max_bytes'] / MIB:.1f} MiB (checkpoint max {s['checkpoint_max_bytes'] / MIB:.2f} MiB) "
        f"with a backlog of up to {s['backlog_max']:,} messages; disk minus backlog bytes at most "
        f"{s['disk_over_backlog_max_bytes'] / MIB:.1f} MiB",
        f"  target: backlog + {few_segments} segments ({s['disk_bound_bytes'] / MIB:.0f} MiB): "
        f"{verdict(s['disk_target_met'])}",
    ]
    lines.append("broker counters: " + "; ".join(
        f"{name.removeprefix('soak-')} {q['published']:,} in, {q['acked']:,} acked"
        + (f", {q['nacked']:,} nacked" if q["nacked"] else "")
        + (f", {q['dead_lettered']:,} dead-lettered" if q["dead_lettered"] else "")
        for name, q in queues.items()))  # fmt: skip
    if s["fsync_p99_ms"]:
        lines.append(
            f"fsync p99 per interval: median {s['fsync_p99_ms']['median']:.2f} ms, worst "
            f"{s['fsync_p99_ms']['max']:.2f} ms; slowest fsync <= {s['fsync_max_bucket_ms']:g} ms (bucket)"
        )
    if s["loop_lag_p99_ms"]:
        lines.append(
            f"event-loop lag p99 per interval: median {s['loop_lag_p99_ms']['median']:.2f} ms, worst "
            f"{s['loop_lag_p99_ms']['max']:.2f} ms; max <= {s['loop_lag_max_bucket_ms']:g} ms (bucket); "
            f"{s['loop_lag_stalls']} of {s['intervals']} intervals saw a lag over {STALL_MS:g} ms"
        )
        if s["loop_lag_stalls"] and None not in (s.get("loop_lag_stalls_on_cpu"), s.get("loop_lag_stalls_waiting")):
            lines.append(
                f"  of them, {s['loop_lag_stalls_on_cpu']} with over {STALL_MS:g} ms of the lag on the loop thread's "
                f"CPU (the broker's own work), {s['loop_lag_stalls_waiting']} with over {STALL_MS:g} ms waiting for "
                "a core (the machine's); in the rest the thread was blocked (the GIL, or the kernel)"
            )
        if s.get("loop_lag_max_since_start_ms") is not None:
            lines.append(f"  largest lag since the broker started: {s['loop_lag_max_since_start_ms']:.1f} ms")
    elif not s["loop_lag_exported"]:
        lines.append("event-loop lag: not exported by this broker (no chute_event_loop_lag_seconds)")
    return lines


def write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({key: _cell(row[key]) for key in columns})


def _cell(value: object) -> object:
    if isinstance(value, float):
        return f"{value:.6g}"
    return "" if value is None else value


def write_json(path: Path, report: dict) -> None:
    path.write_text(json.dumps(report, indent=2) + "\n")


def draw(path: Path, rows: list[dict], summary: dict, title: str, segment_bytes: int) -> None:
    """One PNG, five panels over time: RSS; disk, checkpoint and backlog; fsync; loop lag; rates."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    t = [row["t_s"] for row in rows]

    def col(key: str, scale: float = 1.0) -> list[float]:
        return [float("nan") if row[key] is None else row[key] * scale for row in rows]

    figure, axes = pyplot.subplots(5, 1, figsize=(11, 15), sharex=True)
    rss_ax, disk_ax, fsync_ax, lag_ax, rate_ax = axes
    rss_ax.plot(t, col("rss_mb"), color="tab:red", label="broker RSS")
    rss_ax.axvline(summary["warmup_s"], color="grey", linestyle=":", label="end of warm-up")
    median = summary["rss_after_warmup_mb"]["median"]
    rss_ax.axhspan(median * 0.9, median * 1.1, color="tab:red", alpha=0.08, label="median ±10%")
    rss_ax.set_ylabel("MB")
    rss_ax.set_ylim(bottom=0)

    disk_ax.plot(t, col("disk_bytes", 1 / MIB), color="tab:blue", label="data directory")
    disk_ax.plot(t, col("checkpoint_bytes", 1 / MIB), color="tab:cyan", label="checkpoint file")
    disk_ax.plot(t, col("backlog_bytes", 1 / MIB), color="tab:purple", label="backlog body bytes")
    disk_ax.set_ylabel("MiB")
    disk_ax.set_ylim(bottom=0)
    backlog_ax = disk_ax.twinx()
    backlog_ax.plot(t, col("backlog"), color="tab:green", alpha=0.6, label="backlog (messages)")
    backlog_ax.plot(t, col("slow_backlog"), color="tab:olive", alpha=0.6, label="slow consumer's backlog")
    backlog_ax.set_ylabel("messages")
    backlog_ax.set_ylim(bottom=0)
    backlog_ax.legend(loc="upper right", fontsize="small")

    fsync_ax.plot(t, col("fsync_p50_ms"), color="tab:gray", label="fsync p50")
    fsync_ax.plot(t, col("fsync_p99_ms"), color="tab:orange", label="fsync p99")
    fsync_ax.set_ylabel("ms")
    fsync_ax.set_ylim(bottom=0)

    if summary["loop_lag_exported"]:
        lag_ax.plot(t, col("loop_lag_p99_ms"), color="tab:brown", label="loop lag p99")
        lag_ax.plot(t, col("loop_lag_max_ms"), color="black", linewidth=0.6, label="loop lag max (bucket bound)")
        lag_ax.plot(t, col("loop_lag_on_cpu_max_ms"), color="tab:red", linewidth=0.6,
                    label="largest on-CPU part of a lag (bucket bound)")  # fmt: skip
        lag_ax.plot(t, col("loop_lag_waiting_max_ms"), color="tab:gray", linewidth=0.6, alpha=0.7,
                    label="largest part of a lag waiting for a core (bucket bound)")  # fmt: skip
        lag_ax.set_ylim(bottom=0)
    else:
        lag_ax.text(0.5, 0.5, "event-loop lag not exported by this broker", ha="center", va="center",
                    transform=lag_ax.transAxes)  # fmt: skip
    lag_ax.set_ylabel("ms")

    rate_ax.plot(t, col("publish_rate"), color="tab:blue", label="published (confirmed)")
    rate_ax.plot(t, col("ack_rate"), color="tab:green", label="acked deliveries (confirmed)")
    rate_ax.set_ylabel("msg/s")
    rate_ax.set_ylim(bottom=0)
    rate_ax.set_xlabel("seconds since the workload started")

    titles = ["broker RSS", f"disk (segments of {segment_bytes / MIB:g} MiB) and backlog", "fsync latency per interval",
              "event-loop lag per interval", "rates"]  # fmt: skip
    for ax, name in zip(axes, titles, strict=True):
        ax.set_title(name, loc="left", fontsize="medium")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="upper left", fontsize="small")
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    pyplot.close(figure)
