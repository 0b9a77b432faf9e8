"""The scaling report: ``SCALING.md`` and its plots, drawn from the results JSON alone.

* log-log plots of time and of peak memory against cells, one panel per capability, ours
  beside SnapATAC2's line where it has one (``scaling_time.png``, ``scaling_memory.png``);
* the growth exponent ``a`` of each series (cost proportional to ``n^a``): least squares on
  log cost against log cells, over the sizes from 100k to 1M where two or more exist, else
  over every size measured (the table says which);
* the ratios ours / SnapATAC2 from the same run, and each target met or short;
* a scale-out projection to 16 and 64 workers from the measured Dask tasks
  (:func:`project`; the assumptions are written into the report).

``bench_scaling.py --report-only`` calls :func:`write_report`.
"""

from __future__ import annotations

import datetime as _dt
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from harness import plots
from harness.memory import GIB
from scaling_capabilities import CAPABILITIES, MATCHED

US = "scatac-dist"
SNAP = "snapatac2"
#: the issue's targets
TIME_RATIO = 0.5
MEM_RATIO_SMALL, MEM_RATIO_LARGE, LARGE = 1.0, 0.5, 100_000
PIPELINE_1M_S = 15 * 60
PROCESS_GIB_1M_500K = 8.0
EXPONENT_MAX = 1.1
#: scale-out model: bytes/s of the link the workers' transfers are assumed to share (10 Gb/s)
BANDWIDTH = 1.25e9
#: what the full run's figures say, written by hand and appended to SCALING.md
NOTES = Path(__file__).resolve().parent / "scaling_notes.md"
PROJECT_TO = (16, 64)
#: SnapATAC2 2.9's counterpart of each capability (the pipeline's is measured)
SNAP_COUNTERPART = {
    "ingest": "none for a peak matrix: `snap.pp.import_fragments` builds a tile/peak matrix from fragment "
              "files (another input), `snap.read_10x_mtx` reads a 10x folder into memory; not measured",
    "pipeline": "`pp.select_features` + `tl.spectral` + `pp.knn` + `tl.leiden` (backed mode above 1e8 values): "
                "**measured**, against our select_features + spectral + neighbors + leiden",
    "jaccard": "none: `tl.spectral(distance_metric='jaccard')` uses a Jaccard kernel inside the embedding but "
               "returns no similarity or neighbour list",
    "sccase": "none", "scale_epoch": "none", "scembed_epoch": "none", "scmvp_epoch": "none",
}


@dataclass
class ReportPaths:
    """Where the report goes: the Markdown file, the two plots, and whether the
    ``scaling`` block of RESULTS.md is rewritten (only for the main results file)."""

    md: Path
    time_png: Path
    memory_png: Path
    results_block: bool

    @classmethod
    def for_results(cls, json_path: Path, main_json: Path, bench: Path) -> ReportPaths:
        if Path(json_path).resolve() == Path(main_json).resolve():
            res = main_json.parent
            return cls(bench / "SCALING.md", res / "scaling_time.png", res / "scaling_memory.png", True)
        stem = Path(json_path).with_suffix("")
        return cls(stem.with_suffix(".md"), Path(f"{stem}_time.png"), Path(f"{stem}_memory.png"), False)


# --------------------------------------------------------------------------- reading the runs


def ok(r: dict) -> bool:
    return "failed" not in r and r.get("status", "ok") == "ok" and r.get("time_s") is not None


def series_key(r: dict) -> tuple:
    return (r["preset"], r["n_peaks"], r["capability"], r["system"], r["workers"])


def group(runs: list[dict]) -> dict[tuple, list[dict]]:
    """Successful runs by (preset, peaks, capability, system, workers), sorted by cells."""
    out: dict[tuple, list[dict]] = defaultdict(list)
    for r in runs:
        if ok(r):
            out[series_key(r)].append(r)
    return {k: sorted(v, key=lambda r: r["n_cells"]) for k, v in sorted(out.items(), key=lambda kv: str(kv[0]))}


def compare_time(r: dict) -> float | None:
    """The time compared with SnapATAC2: the matched stages for the pipeline."""
    return r.get("matched_s") if r["capability"] == "pipeline" else r.get("time_s")


def fit_exponent(ns: list[int], ys: list[float]) -> tuple[float | None, list[int]]:
    """Slope of log y on log n (least squares) over the sizes from 100k to 1M where two or
    more exist, else over all; ``None`` with fewer than two sizes."""
    pts = [(n, y) for n, y in zip(ns, ys) if y and y > 0]
    use = [p for p in pts if LARGE <= p[0] <= 1_000_000]
    if len({n for n, _ in use}) < 2:
        use = pts
    if len({n for n, _ in use}) < 2:
        return None, [n for n, _ in use]
    xs = [math.log(n) for n, _ in use]
    zs = [math.log(y) for _, y in use]
    mx, mz = sum(xs) / len(xs), sum(zs) / len(zs)
    a = sum((x - mx) * (z - mz) for x, z in zip(xs, zs)) / sum((x - mx) ** 2 for x in xs)
    return a, [n for n, _ in use]


# --------------------------------------------------------------------------- scale-out model


def transfer_bytes(t: dict, workers: int) -> float:
    """Bytes expected to cross between workers on ``workers`` of them: the measured remote
    bytes scaled by ``(1 - 1/W) / (1 - 1/W_measured)`` (the locality Dask achieved, kept);
    measured on one worker (nothing was remote), every input's bytes times ``1 - 1/W``."""
    wm = t.get("workers") or 1
    if wm > 1:
        return t["remote_bytes"] * (1 - 1 / workers) / (1 - 1 / wm)
    return t["dep_bytes"] * (1 - 1 / workers)


def project_stage(st: dict, workers: int, bandwidth: float = BANDWIDTH) -> float:
    """Modelled seconds of one measured stage on ``workers`` workers:
    ``serial + compute / W + transfer_bytes(W) / bandwidth + idle_per_task * tasks / W``.
    A stage with no Dask task is all serial."""
    t = st.get("tasks") or {}
    if not t.get("n_tasks"):
        return st["seconds"]
    w = workers
    return (t["serial_s"] + t["compute_s"] / w + transfer_bytes(t, w) / bandwidth
            + t["idle_per_task_s"] * t["n_tasks"] / w)


def project(r: dict, workers: int, bandwidth: float = BANDWIDTH) -> dict:
    """The counted stages of run ``r`` on ``workers`` workers: total seconds and its serial part."""
    stages = [s for s in (r.get("stages") or {}).values() if s.get("counted", True)]
    # a projected epoch: the training it adds to the measured steps is serial (not Dask tasks)
    extra = r["time_s"] - r["measured_time_s"] if r.get("time_projected") else 0.0
    total = sum(project_stage(s, workers, bandwidth) for s in stages) + extra
    serial = sum((s.get("tasks") or {}).get("serial_s", s["seconds"]) if (s.get("tasks") or {}).get("n_tasks")
                 else s["seconds"] for s in stages) + extra
    return {"seconds": total, "serial_s": serial}


# --------------------------------------------------------------------------- plots


def _label(key: tuple) -> str:
    preset, peaks, _, system, w = key
    who = "SnapATAC2 2.9" if system == SNAP else f"ours, {w} worker{'s' * (w > 1)}"
    return f"{who}, {preset} {peaks // 1000}k peaks"


def draw(runs: list[dict], paths: ReportPaths) -> None:
    plt = plots.pyplot()
    groups = group(runs)
    caps = [c for c in CAPABILITIES if any(k[2] == c for k in groups)]
    if not caps:
        return
    combos = sorted({(k[0], k[1]) for k in groups})
    colours = {c: plt.get_cmap("tab10")(i % 10) for i, c in enumerate(combos)}
    markers = {w: m for w, m in zip(sorted({k[4] for k in groups if k[3] == US}), "o^vD<>")}
    for what, path in (("time", paths.time_png), ("memory", paths.memory_png)):
        cols = min(4, len(caps))
        rows = math.ceil(len(caps) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.9 * rows), squeeze=False)
        for ax, cap in zip(axes.ravel(), caps):
            for key, rs in groups.items():
                if key[2] != cap:
                    continue
                x = [r["n_cells"] for r in rs]
                col = colours[(key[0], key[1])]
                if key[3] == SNAP:
                    y = [r["time_s"] if what == "time" else r["peak_rss_tree"] / GIB for r in rs]
                    ax.plot(x, y, "s:", color=col, mec="k", label=_label(key) + (" (matched stages)" if what == "time"
                                                                                 else ""))
                    continue
                mk = markers.get(key[4], "o")
                if what == "time":
                    ax.plot(x, [r["time_s"] for r in rs], "-" + mk, color=col, label=_label(key))
                    if cap == "pipeline":
                        ax.plot(x, [r["matched_s"] for r in rs], "--" + mk, color=col, alpha=0.7,
                                label=_label(key) + " (matched stages)")
                else:
                    ax.plot(x, [r["peak_rss_tree"] / GIB for r in rs], "-" + mk, color=col,
                            label=_label(key) + " (all processes)")
                    ax.plot(x, [r["peak_rss_max_process"] / GIB for r in rs], ":" + mk, color=col, alpha=0.6,
                            label=_label(key) + " (largest process)")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_title(cap)
            ax.set_xlabel("cells")
            ax.set_ylabel("wall time (s)" if what == "time" else "peak RSS (GiB)")
            if what == "memory":
                ax.axhline(PROCESS_GIB_1M_500K, color="r", lw=0.8, ls=":")
        spare = list(axes.ravel()[len(caps):])
        for ax in spare:
            ax.axis("off")
        # the longest legends would hide their lines: the empty panels hold them, longest first
        for ax, cap in sorted(zip(axes.ravel(), caps), key=lambda p: -len(p[0].get_legend_handles_labels()[0])):
            handles, labels = ax.get_legend_handles_labels()
            if len(handles) > 6 and spare:
                spare.pop(0).legend(handles, labels, fontsize=7, loc="center", title=cap, title_fontsize=8)
            else:
                ax.legend(fontsize=6)
        plots.save(fig, path, dpi=100, tight=True)


# --------------------------------------------------------------------------- Markdown


def _f(x, nd=0) -> str:
    return "-" if x is None else f"{x:,.{nd}f}"


def _gib(b) -> str:
    return "-" if b is None else f"{b / GIB:.2f}"


def _gb(b) -> str:
    return "-" if b is None else f"{b / 1e9:.2f}"


def _met(ok_: bool | None) -> str:
    return "not measured" if ok_ is None else ("met" if ok_ else "**short**")


def _rel(path: Path, md: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(md.resolve().parent))
    except ValueError:
        return str(path)


def capability_rows(runs: list[dict]) -> list[str]:
    lines = ["| capability | preset | peaks | cells | system | workers | time (s) | per epoch (s) | peak RSS all "
             "(GiB) | largest process (GiB) | store read (GB) | read_chars (GB) | Dask tasks | status |",
             "|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    order = {c: i for i, c in enumerate(CAPABILITIES)}
    for r in sorted(runs, key=lambda r: (order.get(r["capability"], 99), r["preset"], r["n_peaks"], r["n_cells"],
                                         r["system"], r["workers"])):
        d = r.get("details") or {}
        per_epoch = d.get("per_epoch_s")
        pe = "-" if per_epoch is None else f"{per_epoch:,.1f}" + (" (projected)" if d.get("epoch_projected") else "")
        recorded = [s["tasks"] for s in (r.get("stages") or {}).values() if s.get("counted", True) and "tasks" in s]
        tasks = sum(t.get("n_tasks") or 0 for t in recorded) if recorded else None
        t = compare_time(r) if r["system"] == SNAP else r.get("time_s")
        t = _f(t, 1) + (" (projected)" if r.get("time_projected") else "")
        status = "ok" if ok(r) else (r.get("failed") or r.get("status") or "?").strip().splitlines()[-1][:70]
        lines.append(f"| {r['capability']} | {r['preset']} | {r['n_peaks']:,} | {r['n_cells']:,} | "
                     f"{'SnapATAC2 2.9 (' + r.get('mode', '?') + ')' if r['system'] == SNAP else 'ours'} | "
                     f"{r['workers']} | {t} | {pe} | {_gib(r.get('peak_rss_tree'))} | "
                     f"{_gib(r.get('peak_rss_max_process', r.get('peak_rss_tree')))} | "
                     f"{_gb(r.get('store_read_bytes'))} | {_gb(r.get('read_chars'))} | {_f(tasks)} | {status} |")
    return lines


def pipeline_stage_rows(runs: list[dict]) -> list[str]:
    ours = [r for r in runs if ok(r) and r["system"] == US and r["capability"] == "pipeline"]
    if not ours:
        return []
    names = list(ours[0]["stages"])
    names = [n for n in names if ours[0]["stages"][n].get("counted", True)]
    lines = ["| preset | peaks | cells | workers | " + " | ".join(names) + " |",
             "|---|---:|---:|---:|" + "---:|" * len(names)]
    for r in sorted(ours, key=lambda r: (r["preset"], r["n_peaks"], r["n_cells"], r["workers"])):
        lines.append(f"| {r['preset']} | {r['n_peaks']:,} | {r['n_cells']:,} | {r['workers']} | "
                     + " | ".join(_f((r["stages"].get(n) or {}).get("seconds"), 1) for n in names) + " |")
    return lines


def exponent_rows(runs: list[dict]) -> tuple[list[str], list[tuple]]:
    lines = ["| capability | preset | peaks | system | workers | a (time) | a (peak memory, all processes) | "
             "sizes fitted | target a ≤ 1.1 (time) |", "|---|---|---:|---|---:|---:|---:|---|---|"]
    verdicts = []
    for key, rs in group(runs).items():
        ns = [r["n_cells"] for r in rs]
        at, used = fit_exponent(ns, [compare_time(r) if key[3] == SNAP else r["time_s"] for r in rs])
        am, _ = fit_exponent(ns, [r.get("peak_rss_tree") for r in rs])
        in_range = bool(used) and min(used) >= LARGE
        verdict = None if at is None or not in_range else at <= EXPONENT_MAX
        if key[3] == US:
            verdicts.append((key, at, verdict))
        sizes = ", ".join(f"{n // 1000}k" if n >= 1000 else str(n) for n in used) or "-"
        lines.append(f"| {key[2]} | {key[0]} | {key[1]:,} | {'SnapATAC2' if key[3] == SNAP else 'ours'} | {key[4]} | "
                     f"{_f(at, 2)} | {_f(am, 2)} | {sizes} | "
                     f"{_met(verdict) if key[3] == US else '-'}"
                     f"{'' if in_range or at is None else ' (sizes below 100k: not the target range)'} |")
    return lines, verdicts


def stopped_bounds(runs: list[dict]) -> list[tuple[tuple, float]]:
    """Our series whose largest size in the target's range was stopped (time-out, memory limit,
    by hand): a lower bound on the exponent, from the largest size measured at or above 100k
    to the wall seconds the stopped run had used (``external['wall_s']``)."""
    done = group(runs)
    out = []
    for r in runs:
        wall = (r.get("external") or {}).get("wall_s")
        if r["system"] != US or ok(r) or not wall or r["n_cells"] <= LARGE:
            continue
        below = [x for x in done.get(series_key(r), []) if LARGE <= x["n_cells"] < r["n_cells"]]
        if below:
            ref = below[-1]
            out.append((series_key(r) + (r["n_cells"],),
                        math.log(wall / ref["time_s"]) / math.log(r["n_cells"] / ref["n_cells"])))
    return out


def ratio_rows(runs: list[dict]) -> tuple[list[str], list[tuple]]:
    snap = {(r["preset"], r["n_peaks"], r["n_cells"]): r for r in runs
            if r["system"] == SNAP and r["capability"] == "pipeline"}
    ours = sorted((r for r in runs if ok(r) and r["system"] == US and r["capability"] == "pipeline"),
                  key=lambda r: (r["preset"], r["n_peaks"], r["n_cells"], r["workers"]))
    lines = ["| preset | peaks | cells | workers | ours matched (s) | SnapATAC2 matched (s) | time ratio | target | "
             "ours peak all (GiB) | SnapATAC2 peak (GiB) | memory ratio | target | ARI ours / SnapATAC2 |",
             "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---|---|"]
    verdicts = []
    for r in ours:
        s = snap.get((r["preset"], r["n_peaks"], r["n_cells"]))
        mem_target = MEM_RATIO_LARGE if r["n_cells"] >= LARGE else MEM_RATIO_SMALL
        if s is None:
            lines.append(f"| {r['preset']} | {r['n_peaks']:,} | {r['n_cells']:,} | {r['workers']} | "
                         f"{_f(r['matched_s'], 1)} | not run | - | ≤ {TIME_RATIO} | {_gib(r['peak_rss_tree'])} | - | - "
                         f"| ≤ {mem_target} | - |")
            continue
        if not ok(s):
            why = (s.get("failed") or "?").strip().splitlines()[-1][:60]
            lines.append(f"| {r['preset']} | {r['n_peaks']:,} | {r['n_cells']:,} | {r['workers']} | "
                         f"{_f(r['matched_s'], 1)} | failed: {why} | - | ≤ {TIME_RATIO} | {_gib(r['peak_rss_tree'])} | "
                         f"- | - | ≤ {mem_target} | - |")
            continue
        tr = r["matched_s"] / s["matched_s"]
        mr = r["peak_rss_tree"] / s["peak_rss_tree"]
        verdicts.append((r, tr, mr, mem_target))
        qa = (r.get("quality") or {}).get("leiden_ari")
        qs = (s.get("quality") or {}).get("leiden_ari")
        lines.append(f"| {r['preset']} | {r['n_peaks']:,} | {r['n_cells']:,} | {r['workers']} | {_f(r['matched_s'], 1)} "
                     f"| {_f(s['matched_s'], 1)} ({s.get('mode', '?')}) | {tr:.2f} | ≤ {TIME_RATIO}: "
                     f"{_met(tr <= TIME_RATIO)} | {_gib(r['peak_rss_tree'])} | {_gib(s['peak_rss_tree'])} | {mr:.2f} | "
                     f"≤ {mem_target}: {_met(mr <= mem_target)} | {_f(qa, 3)} / {_f(qs, 3)} |")
    return lines, verdicts


def target_rows(runs: list[dict], ratios: list[tuple], exps: list[tuple],
                stopped: list[tuple[tuple, float]]) -> list[str]:
    lines = ["| target | measured | verdict |", "|---|---|---|"]
    for label, idx, tgt_of in (("time ≤ 0.5x SnapATAC2 (matched stages), every size", 1, lambda v: TIME_RATIO),
                               ("peak memory ≤ 0.5x at ≥ 100k cells, ≤ 1x below", 2, lambda v: v[3])):
        if not ratios:
            lines.append(f"| {label} | no run beside SnapATAC2 | not measured |")
            continue
        met = [v[idx] <= tgt_of(v) for v in ratios]
        per_size = defaultdict(list)
        for v in ratios:
            per_size[v[0]["n_cells"]].append(v[idx])
        desc = "; ".join(f"{n:,}: {min(x):.2f}-{max(x):.2f}" if len(x) > 1 else f"{n:,}: {x[0]:.2f}"
                         for n, x in sorted(per_size.items()))
        lines.append(f"| {label} | {desc} | {sum(met)} of {len(met)} met |")
    big = [r for r in runs if r["system"] == US and r["capability"] == "pipeline" and r["n_cells"] == 1_000_000
           and r["n_peaks"] == 100_000]
    if big:
        desc = "; ".join(f"{r['preset']}, {r['workers']} workers: "
                         + (f"{r['time_s']:,.0f} s" if ok(r) else "failed") for r in big)
        lines.append(f"| whole pipeline at 1M x 100k < 15 min | {desc} | "
                     f"{_met(all(ok(r) and r['time_s'] < PIPELINE_1M_S for r in big))} |")
    else:
        lines.append("| whole pipeline at 1M x 100k < 15 min | - | not measured |")
    big = [r for r in runs if r["system"] == US and r["n_cells"] == 1_000_000 and r["n_peaks"] == 500_000]
    if big:
        worst_p = max(big, key=lambda r: r.get("peak_rss_max_process") or 0)
        failed = [r["capability"] for r in big if not ok(r)]
        desc = (f"largest: {_gib(worst_p.get('peak_rss_max_process'))} GiB ({worst_p['capability']}, "
                f"{worst_p['preset']})" + (f"; not completed: {', '.join(failed)}" if failed else ""))
        lines.append(f"| every process < 8 GiB at 1M x 500k | {desc} | "
                     f"{_met(not failed and all((r.get('peak_rss_max_process') or 0) < PROCESS_GIB_1M_500K * GIB for r in big))} |")
    else:
        lines.append("| every process < 8 GiB at 1M x 500k | - | not measured |")
    judged = [e for e in exps if e[2] is not None]
    if judged or stopped:
        short = [f"{k[2]} ({k[0]}, {k[1] // 1000}k, {k[4]}w): {a:.2f}" for k, a, v in judged if not v]
        unknown = [f"{k[2]} ({k[0]}, {k[1] // 1000}k, {k[4]}w) stopped at {k[5] // 1000}k: a > {a:.2f}"
                   for k, a in stopped]
        lines.append(f"| growth exponent ≤ 1.1, 100k-1M, every capability | {len(judged)} series fitted"
                     + (f"; over: {'; '.join(short)}" if short else "")
                     + (f"; not measured to the end: {'; '.join(unknown)}" if unknown else "")
                     + f" | {sum(v for *_, v in judged)} of {len(judged) + len(stopped)} met"
                     + (f", {len(stopped)} unknown" if stopped else "") + " |")
    else:
        lines.append("| growth exponent ≤ 1.1, 100k-1M, every capability | no series with two sizes in 100k-1M | "
                     "not measured |")
    return lines


def projection_rows(runs: list[dict], bandwidth: float) -> list[str]:
    lines = ["| capability | preset | peaks | cells | measured on | measured (s) | model at that W (s) | "
             + " | ".join(f"{w} workers (s)" for w in PROJECT_TO) + f" | serial part (s) | speed-up at {PROJECT_TO[-1]} |",
             "|---|---|---:|---:|---:|---:|---:|" + "---:|" * len(PROJECT_TO) + "---:|---:|"]
    for key, rs in group(runs).items():
        if key[3] != US:
            continue
        r = rs[-1]  # the largest atlas measured
        if not any((s.get("tasks") or {}).get("n_tasks") for s in (r.get("stages") or {}).values()):
            continue
        here = project(r, key[4], bandwidth)
        far = [project(r, w, bandwidth) for w in PROJECT_TO]
        lines.append(f"| {key[2]} | {key[0]} | {key[1]:,} | {r['n_cells']:,} | {key[4]} | {_f(r['time_s'], 1)} | "
                     f"{_f(here['seconds'], 1)} | " + " | ".join(_f(p["seconds"], 1) for p in far)
                     + f" | {_f(here['serial_s'], 1)} | {r['time_s'] / far[-1]['seconds']:.1f}x |")
    return lines


def atlas_rows(runs: list[dict]) -> list[str]:
    seen = {}
    for r in runs:
        if r.get("nnz") and r["system"] == US and r["capability"] != "ingest":
            key = (r["preset"] + (" (multiome)" if r["capability"] == "scmvp_epoch" else ""), r["n_peaks"], r["n_cells"])
            seen[key] = r["nnz"]
    lines = ["| atlas | peaks | cells | non-zeros | per cell |", "|---|---:|---:|---:|---:|"]
    for (p, peaks, n), nnz in sorted(seen.items()):
        lines.append(f"| {p} | {peaks:,} | {n:,} | {nnz:,} | {nnz / n:,.0f} |")
    return lines


def write_report(results: dict, paths: ReportPaths, *, json_path: Path, bandwidth: float = BANDWIDTH,
                 command: str | None = None) -> None:
    """Draw the plots and write ``paths.md`` (and the RESULTS.md block) from ``results``."""
    runs = results.get("runs", [])
    draw(runs, paths)
    exp_lines, exps = exponent_rows(runs)
    stopped = stopped_bounds(runs)
    ratio_lines, ratios = ratio_rows(runs)
    m = results.get("machine") or {}
    md = paths.md
    text = [
        "# Scaling: every capability against atlas size",
        "",
        f"Generated by `benchmarks/bench_scaling.py` from `{_rel(json_path, md)}` on "
        f"{_dt.date.today().isoformat()} (`--report-only` redraws it from the JSON). Machine of the runs: "
        f"{m.get('cpus', '?')} cores, {m.get('memory_gib', '?')} GiB, Python {m.get('python', '?')}."
        + (f" Last command: `{command}`." if command else ""),
        "",
        "Each run is one capability on one atlas in a fresh process tree: the client (which also runs the Dask "
        "scheduler and the nannies) and W worker processes of one thread. **Time**: wall seconds of the "
        "capability's own stages (cluster start-up and the prerequisites the capability takes as given are "
        "recorded but not counted; `ingest` is the whole command). **Memory**: peak RSS summed over every "
        "process of the tree, and of its largest process, sampled every 0.2 s. **Store read**: bytes zarr read "
        "from stores in every process (compressed chunks as on disk); **read_chars**: every byte the tree's "
        "processes read from files (the kernel's `rchar`: imports, inputs, scratch files; the one figure "
        "SnapATAC2 has too). SnapATAC2 2.9 runs in its own process with all cores "
        "(`benchmarks/snapatac2_runner.py`; backed mode above 1e8 stored values, the zarr store first copied "
        "to an h5ad, untimed). What each capability runs: `benchmarks/scaling_capabilities.py`.",
        "",
        "## Atlases",
        "",
        "`synthetic`: `datasets.synthesize` (10 types, about 1,000 fragments per cell); `mouse` and `human`: "
        "`datasets.synthesize_like` with the presets calibrated on the SNARE MOp ATAC (mm10) and bm0828 "
        "(hg19); scMVP runs on a joint RNA + ATAC synthetic atlas of the same cells and peaks (2,000 genes).",
        "",
        *atlas_rows(runs),
        "",
        "## Time and memory against cells",
        "",
        f"![time]({_rel(paths.time_png, md)})",
        "",
        f"![memory]({_rel(paths.memory_png, md)})",
        "",
        *capability_rows(runs),
        "",
        "Pipeline stages (s):",
        "",
        *pipeline_stage_rows(runs),
        "",
        "## Growth exponents",
        "",
        "Cost proportional to n^a: least squares of log cost on log cells, over the sizes from 100k to 1M "
        "where two or more were measured, else over every size measured (then it is no verdict on the "
        "target, which is about 100k-1M). Time is the capability's time (SnapATAC2: matched stages); memory "
        "the peak of all processes.",
        "",
        *exp_lines,
        "",
        *(["Stopped before the end, so only a lower bound (from the last size measured to the wall "
           "time the stopped run had used): "
           + "; ".join(f"{k[2]}, {k[0]}, {k[1]:,} peaks, at {k[5]:,} cells: a > {a:.2f}" for k, a in stopped)
           + ".", ""] if stopped else []),
        "## Against SnapATAC2 (same run)",
        "",
        "Matched stages: our select_features + spectral + neighbors + leiden against SnapATAC2's "
        "select_features + spectral + knn + leiden. Memory: our peak over the whole pipeline (every stage, "
        "all processes) against SnapATAC2's whole process (loading included). Ratios are ours / SnapATAC2.",
        "",
        *ratio_lines,
        "",
        "SnapATAC2's counterpart of each capability:",
        "",
        "| capability | SnapATAC2 2.9 |",
        "|---|---|",
        *[f"| {c} | {SNAP_COUNTERPART[c]} |" for c in CAPABILITIES],
        "",
        "## Targets",
        "",
        *target_rows(runs, ratios, exps, stopped),
        "",
        "## Scale-out projection",
        "",
        "From the Dask tasks recorded by the scheduler during each stage (a scheduler plugin, "
        "`benchmarks/harness/hooks/scatac_bench_tasks.py`), the largest atlas of each series. Per stage, on W "
        "workers:",
        "",
        "    T(W) = S + C / W + X(W) / B + o N / W",
        "",
        "* **S**, serial: the stage's wall time during which no task was computing (client and scheduler work: "
        "graph building, gathering results, client-side solvers, Leiden, UMAP's layout, and every training loop, "
        "which is not a Dask task). It does not shrink with workers.",
        "* **C**: the sum of the tasks' compute times, divided evenly (no imbalance, no stragglers).",
        "* **X(W)**, bytes between workers: the bytes of inputs a task fetched from another worker, as measured "
        "(each input once per worker that fetched it), scaled by (1 - 1/W) / (1 - 1/W_measured): the share of "
        "inputs that live elsewhere grows as with placement unrelated to data, from the locality Dask reached "
        "on the measured workers (persisted blocks stay where they are). Measured on one worker, every input's "
        f"bytes times (1 - 1/W) instead. All through one shared link of **B = {bandwidth / 1e9:.2f} GB/s** "
        "(10 Gb/s; pessimistic where workers sit on separate nodes, optimistic for a crowded switch).",
        "* **o N / W**: worker time inside the busy span that no task used, per task (o, measured: scheduling "
        "gaps, waits for inputs, imbalance), times the N tasks, spread over the workers.",
        "* Not modelled: the scheduler's own per-task cost growing with W (it is in S as measured on few workers), "
        "memory limits, storage bandwidth shared by W readers (the store is assumed to serve them all), "
        "DDP training of SCALE and scMVP over several ranks (counted as serial here).",
        "",
        "The model at the measured W reproduces the measured time by construction (a check on the "
        "bookkeeping, not of the model).",
        "",
        *projection_rows(runs, bandwidth),
        "",
    ]
    if paths.results_block and NOTES.exists():  # the full run's reading, written by hand
        text += [NOTES.read_text().rstrip(), ""]
    md.parent.mkdir(parents=True, exist_ok=True)
    md.write_text("\n".join(text))
    print(f"wrote {md}, {paths.time_png}, {paths.memory_png}", flush=True)
    if paths.results_block:
        results_block(runs, md)


def results_block(runs: list[dict], md: Path) -> None:
    """The ``scaling`` block of RESULTS.md: the pipeline against SnapATAC2, and a pointer to SCALING.md."""
    from harness.report import publish

    lines, _ = ratio_rows(runs)
    # a plain path, not a link: the docs site includes RESULTS.md, where a link to SCALING.md would not resolve
    publish("scaling", "## Scaling (`python benchmarks/bench_scaling.py`)\n\n"
            f"Every capability's cost curve, growth exponents, the targets and the scale-out projection: "
            f"`benchmarks/{md.name}`. The default pipeline "
            "against SnapATAC2 2.9 in the same run (matched stages: " + " + ".join(MATCHED)
            + "; memory: all our processes over the whole pipeline against SnapATAC2's process):\n\n",
            [*lines, "", "Per-stage wall time (s):", "", *pipeline_stage_rows(runs)], echo=False)
