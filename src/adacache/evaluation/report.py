"""From a bench's records to its report: `report.json` (settings, environment, per-video records, per-method
aggregates, verdicts), `report.md` (a table shaped like the paper's Table 1, then the verdicts) and two plots:
quality against speed-up for every method (`pareto.png`) and computed steps per video against the video's measured
motion (`motion.png`).

Verdicts at matched speed-up: AdaCache's front is the upper envelope (Pareto front) of its points in (mean speed-up,
PSNR), and separately in (mean speed-up, SSIM); every peer point (static reuse included) gets the front's PSNR and
SSIM at its own speed-up, linear between the two neighbouring front points and never extrapolated, the margins
(front minus peer) and a verdict on PSNR (`verdicts`)."""

from __future__ import annotations

import json
import math
import platform
import statistics
from pathlib import Path
from typing import Any

from .folder import BenchFolderError, BenchSettings, finite, write_atomic
from .metrics import OBJECT_THRESHOLD

PSNR_CAP = 100.0  # identical videos (infinite PSNR) count as this in means


def environment() -> dict[str, Any]:
    import diffusers
    import numpy
    import torch

    from .. import __version__

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else (platform.processor() or platform.machine())
    return {
        "adacache": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
        "cache_dit": _installed_version("cache-dit"),  # None when the optional peers are not installed
        "numpy": numpy.__version__, "python": platform.python_version(), "platform": platform.platform(),
        "device": "cuda: " + device if torch.cuda.is_available() else "cpu: " + device,
        "threads": torch.get_num_threads(),
    }


def _installed_version(distribution: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def aggregate(records: list[dict[str, Any]], methods: list[str]) -> list[dict[str, Any]]:
    """Per method, in the given order: mean and spread of every measure over its videos."""
    rows = []
    for name in methods:
        mine = [r for r in records if r["method"] == name]
        ok = [r for r in mine if r.get("status") == "ok"]
        row: dict[str, Any] = {"method": name, "family": mine[0]["family"] if mine else None,
                               "videos": len(ok), "skipped": len(mine) - len(ok)}
        if len(ok) < len(mine):
            row["reasons"] = sorted({r.get("reason", "") for r in mine if r.get("status") != "ok"})
        for key in ("speedup", "flops_fraction", "seconds", "ssim", "lpips", "computed_steps", "cache_bytes",
                    "peak_memory_bytes"):
            row[key], row[key + "_std"] = _mean_std([r.get(key) for r in ok])
        # compute speed-up (steps / computed steps) where the method says which steps it computed, and the wall
        # speed-up's share of it per video (what the parts outside the cached blocks cost)
        computes = [(r["steps"] / r["computed_steps"], r.get("speedup")) for r in ok
                    if r.get("steps") and r.get("computed_steps")]
        row["compute_speedup"], _ = _mean_std([c for c, _ in computes])
        row["wall_to_compute"], row["wall_to_compute_std"] = _mean_std([w / c for c, w in computes if w])
        row["psnr"], row["psnr_std"] = _mean_std([min(r["psnr"], PSNR_CAP) if r.get("psnr") is not None
                                                  else (PSNR_CAP if r.get("identical") else None) for r in ok])
        # over the object's pixels only (embedded model; records older than the field lack it and are left out)
        on_object = [min(r["object_psnr"], PSNR_CAP) if r.get("object_psnr") is not None
                     else (PSNR_CAP if r.get("object_identical") else None) for r in ok]
        row["object_psnr"], row["object_psnr_std"] = _mean_std(on_object)
        row["object_psnr_videos"] = sum(v is not None for v in on_object)
        verified = [r["verifier"] for r in ok if r.get("verifier") and "colour" in r["verifier"]]
        if verified:
            moving = [v for v in verified if v["speed_class"] != "still"]
            row["verifier"] = {
                "colour": _share(v["colour"] for v in verified), "shape": _share(v["shape"] for v in verified),
                "direction": _share(v["direction"] for v in moving), "speed": _share(v["speed"] for v in verified),
                "consistency": statistics.fmean(v["consistency"] for v in verified),
            }
            by_speed = {}
            for speed in ("still", "slow", "fast"):
                steps = [r["computed_steps"] for r in ok if r.get("computed_steps") is not None
                         and r["verifier"].get("speed_class") == speed]
                if steps:
                    by_speed[speed] = statistics.fmean(steps)
            if by_speed:
                row["computed_steps_by_speed"] = by_speed
        rows.append(row)
    return rows


def _share(flags) -> float | None:
    flags = list(flags)
    return sum(flags) / len(flags) if flags else None


# --- verdicts at matched speed-up --------------------------------------------------------------------------------
# A PSNR margin smaller than this is a tie (the report prints PSNR to 0.1 dB).
PSNR_TIE_DB = 0.05


def is_adacache_row(row: dict[str, Any]) -> bool:
    """An AdaCache point (family "AdaCache", with or without MoReg or forecast); static reuse is a peer."""
    return bool(row.get("family")) and row["family"].startswith("AdaCache")


def is_peer_row(row: dict[str, Any]) -> bool:
    """A measured point of a method other than the baseline and AdaCache, with a mean speed-up and PSNR."""
    return (row.get("family") not in (None, "baseline") and not is_adacache_row(row) and bool(row.get("videos"))
            and bool(row.get("speedup")) and row.get("psnr") is not None)


def adacache_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The upper envelope (Pareto front) of (speed-up, quality) points: every point that no other point matches or
    beats on both (as fast and better, or faster and as good), by speed-up ascending, so quality descending. Of
    points with equal speed-up only the best stays; of equal quality only the fastest."""
    front: list[tuple[float, float]] = []
    for speedup, quality in sorted(points, key=lambda p: (-p[0], -p[1])):  # fastest first, the best first at ties
        if not front or quality > front[-1][1]:
            front.append((speedup, quality))
    front.reverse()
    return front


def front_at(front: list[tuple[float, float]], speedup: float) -> float | None:
    """The front's quality at `speedup`: linear in speed-up between the two neighbouring front points, the point's
    own at a front point's speed-up, None outside the front's speed-ups (never extrapolated)."""
    if not front or not front[0][0] <= speedup <= front[-1][0]:
        return None
    for (s0, q0), (s1, q1) in zip(front, front[1:]):
        if s0 <= speedup <= s1:  # speed-ups on the front are distinct: s1 > s0
            return q0 + (q1 - q0) * (speedup - s0) / (s1 - s0)
    return front[0][1]  # a front of one point, read at its own speed-up


def _span_text(span: tuple[float, float]) -> str:
    if span[0] == span[1]:
        return f"AdaCache's front is one point, at {span[0]:.2f}x"
    return f"AdaCache points span {span[0]:.2f}-{span[1]:.2f}x"


def verdicts(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Compare every peer point with AdaCache's front at the peer's mean speed-up: sets `row["verdict"]` (and
    `adacache_psnr_at_speedup`) on each peer row; returns both fronts and the count of peer points the front beats
    on PSNR, loses to, ties with, and that lie outside its range."""
    adacache = [r for r in rows if is_adacache_row(r) and r.get("videos") and r.get("speedup")]
    psnr_front = adacache_front([(r["speedup"], r["psnr"]) for r in adacache if r.get("psnr") is not None])
    ssim_front = adacache_front([(r["speedup"], r["ssim"]) for r in adacache if r.get("ssim") is not None])
    span = (psnr_front[0][0], psnr_front[-1][0]) if psnr_front else None
    summary = {"beats": 0, "loses": 0, "ties": 0, "outside": 0}
    for row in filter(is_peer_row, rows):
        front_psnr, front_ssim = front_at(psnr_front, row["speedup"]), front_at(ssim_front, row["speedup"])
        psnr_margin = front_psnr - row["psnr"] if front_psnr is not None else None
        ssim_margin = front_ssim - row["ssim"] if front_ssim is not None and row.get("ssim") is not None else None
        if span is None:
            outcome, text = "outside", "no AdaCache point to compare with"
        elif psnr_margin is None:
            outcome, text = "outside", f"outside AdaCache's range ({_span_text(span)})"
        elif psnr_margin >= PSNR_TIE_DB:
            outcome, text = "beats", f"AdaCache better by {psnr_margin:.1f} dB"
        elif psnr_margin <= -PSNR_TIE_DB:
            outcome, text = "loses", f"peer better by {-psnr_margin:.1f} dB"
        else:
            outcome, text = "ties", f"tie (within {PSNR_TIE_DB} dB)"
        summary[outcome] += 1
        row["adacache_psnr_at_speedup"] = front_psnr
        row["verdict"] = {"speedup": row["speedup"], "psnr": row["psnr"], "front_psnr": front_psnr,
                          "psnr_margin_db": psnr_margin, "ssim": row.get("ssim"), "front_ssim": front_ssim,
                          "ssim_margin": ssim_margin, "outcome": outcome, "verdict": text}
    return {"front": {"psnr": [list(p) for p in psnr_front], "ssim": [list(p) for p in ssim_front]},
            "span": list(span) if span else None, "summary": summary}


def build_report(settings: BenchSettings, records: list[dict[str, Any]], command: str | None = None) -> dict[str, Any]:
    import dataclasses

    records = sorted(records, key=lambda r: (r["video"], settings.methods.index(r["method"])
                                             if r["method"] in settings.methods else -1))
    names = ["none", *[m for m in settings.methods if m != "none"]]
    rows = aggregate(records, names)
    matched = verdicts(rows)  # sets each peer row's verdict
    return {"settings": dataclasses.asdict(settings), "command": command, "environment": environment(),
            "methods": rows, "verdicts": matched, "records": records}


def _fmt(value: Any, spec: str, std: Any = None) -> str:
    if value is None:
        return "–"
    text = format(value, spec)
    return text + (f" ± {format(std, spec)}" if std else "")


def markdown(report: dict[str, Any]) -> str:
    s = report["settings"]
    env = report["environment"]
    lines = [
        f"# adacache bench: {s['model']}",
        "",
        f"{len(s['prompts'])} prompts x {len(s['seeds'])} seeds, {s['steps']} steps, guidance {s['guidance']}, "
        f"timing: median of {s['repeats']} after {s['warmup']} warm-up; {env['device']}, {env['threads']} threads, "
        f"torch {env['torch']}, diffusers {env['diffusers']}, "
        + (f"cache-dit {env['cache_dit']}, " if env.get("cache_dit") else "") + f"adacache {env['adacache']}.",
        "Speed-up: the denoising loop's wall time against the baseline's on the same video (mean ± spread over "
        "videos). FLOPs: the transformer's, counted by torch's FLOP counter, as a fraction of the baseline's. "
        "PSNR/SSIM/LPIPS: against the uncached video of the same seed.",
        "",
    ]
    if report.get("command"):
        lines += [f"Command: `{report['command']}`", ""]
    has_verifier = any("verifier" in m for m in report["methods"])
    has_lpips = any(m.get("lpips") is not None for m in report["methods"])
    has_object = any(m.get("object_psnr") is not None for m in report["methods"])  # the embedded model only
    head = ["Method", "Family"]
    if has_verifier:
        head += ["Colour", "Shape", "Direction", "Speed", "Consistency"]
    head += ["PSNR ↑"] + (["PSNR object ↑"] if has_object else []) + ["SSIM ↑"]
    head += (["LPIPS ↓"] if has_lpips else []) + [
        "FLOPs", "Latency (s)", "Speed-up ↑", "Computed steps", "Cache (MiB)", "AdaCache PSNR at same speed-up"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in report["methods"]:
        if not m["videos"]:
            lines.append(f"| {m['method']} | {m['family']} | not run: {'; '.join(m.get('reasons', []))} |")
            continue
        cells = [m["method"], m["family"]]
        if has_verifier:
            v = m.get("verifier", {})
            cells += [_fmt(v.get(k) and 100 * v[k], ".0f") + ("%" if v.get(k) is not None else "")
                      for k in ("colour", "shape", "direction", "speed")] + [_fmt(v.get("consistency"), ".3f")]
        psnr = "identical" if m["psnr"] == PSNR_CAP else _fmt(m["psnr"], ".1f", m["psnr_std"])
        cells.append(psnr if m["family"] != "baseline" else "–")
        if has_object:
            cells.append(_object_cell(m))
        cells.append(_fmt(m["ssim"], ".3f"))
        if has_lpips:
            cells.append(_fmt(m["lpips"], ".3f"))
        cache = m["cache_bytes"] / 2**20 if m["cache_bytes"] is not None else None
        verdict = m.get("verdict")
        cells += [_fmt(m["flops_fraction"], ".2f") if m["family"] != "baseline" else ("1.00" if m["seconds"] and
                  report["settings"]["flops"] else "–"),
                  _fmt(m["seconds"], ".3f"),
                  _fmt(m["speedup"], ".2f", m["speedup_std"]) + "x" if m["family"] != "baseline" else "1.00x",
                  _fmt(m["computed_steps"], ".1f"), _fmt(cache, ".2f"),
                  _matched_cell(verdict)]
        lines.append("| " + " | ".join(cells) + " |")
    if has_object:
        lines += ["", "PSNR object: PSNR over the pixels where the uncached video shows the object (any channel "
                  f"above {OBJECT_THRESHOLD}, dilated by one pixel; metrics.object_psnr). The black background fills "
                  "most of each frame and lifts the whole-frame PSNR; this is the stricter figure."]
    lines += _verdict_lines(report)
    computes = [m for m in report["methods"] if m.get("compute_speedup") and m.get("wall_to_compute")]
    if computes:
        lines += ["", "Wall-clock speed-up against the compute speed-up (steps / computed steps), mean per video; "
                  "a skipped step still runs what lies outside the cached blocks (embedding, output layer, "
                  "scheduler, CFG):", "", "| Method | compute speed-up | wall speed-up | wall / compute |",
                  "|---|---|---|---|"]
        for m in computes:
            lines.append(f"| {m['method']} | {_fmt(m['compute_speedup'], '.2f')}x | {_fmt(m['speedup'], '.2f')}x | "
                         f"{_fmt(m['wall_to_compute'], '.2f', m['wall_to_compute_std'])} |")
    steps = [m for m in report["methods"] if m.get("computed_steps_by_speed")]
    if steps:
        lines += ["", "Computed steps by the prompt's speed class (mean per video):", "",
                  "| Method | still | slow | fast |", "|---|---|---|---|"]
        for m in steps:
            by = m["computed_steps_by_speed"]
            lines.append(f"| {m['method']} | " + " | ".join(_fmt(by.get(k), ".1f") for k in ("still", "slow", "fast")) + " |")
    skipped = [m for m in report["methods"] if m.get("reasons")]
    if skipped:
        lines += ["", "Skipped or failed:", ""] + [f"- {m['method']}: {'; '.join(m['reasons'])}" for m in skipped]
    return "\n".join(lines) + "\n"


_SHORT = {"beats": "AdaCache better", "loses": "peer better", "ties": "tie", "outside": "outside AdaCache's range"}


def _matched_cell(verdict: dict[str, Any] | None) -> str:
    """The main table's last cell: the front's PSNR at the peer's speed-up, and who is better there."""
    if verdict is None:
        return "–"
    if verdict["front_psnr"] is None:
        return _SHORT["outside"]
    return f"{verdict['front_psnr']:.1f} ({_SHORT[verdict['outcome']]})"


def _verdict_lines(report: dict[str, Any]) -> list[str]:
    """The "Verdicts at matched speed-up" table and its summary line (nothing when there is no peer point)."""
    peers = [m for m in report["methods"] if m.get("verdict")]
    matched = report.get("verdicts")
    if not peers or not matched:
        return []
    span = matched["span"]
    lines = ["", "## Verdicts at matched speed-up", "",
             "Each peer point against AdaCache's front: the upper envelope (Pareto front) of the AdaCache points (its "
             "presets, codebooks and configs, with or without MoReg; static reuse is a peer) in speed-up and PSNR, "
             "and separately in speed-up and SSIM, read at the peer's mean speed-up, linear between the two "
             "neighbouring front points and never extrapolated. Margin: front minus peer.", "",
             "| Peer | Family | Speed-up | PSNR | Front PSNR | Margin (dB) | SSIM | Front SSIM | Margin | Verdict |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for m in peers:
        v = m["verdict"]
        cells = [m["method"], m["family"], f"{v['speedup']:.2f}x", _psnr_text(v["psnr"]), _fmt(v["front_psnr"], ".1f"),
                 _fmt(v["psnr_margin_db"], "+.1f"), _fmt(v["ssim"], ".3f"), _fmt(v["front_ssim"], ".3f"),
                 _fmt(v["ssim_margin"], "+.3f"), v["verdict"]]
        lines.append("| " + " | ".join(cells) + " |")
    count = matched["summary"]
    where = f" ({_span_text(span)})" if span else " (there are no AdaCache points)"
    ties = f", ties {count['ties']}" if count["ties"] else ""
    lines += ["", f"On PSNR at matched speed-up, the AdaCache front beats {count['beats']} of {len(peers)} peer "
                  f"points and loses to {count['loses']}{ties}; {count['outside']} "
                  f"{'lies' if count['outside'] == 1 else 'lie'} outside its range{where}."]
    return lines


def _psnr_text(value: float | None) -> str:
    return "identical" if value == PSNR_CAP else _fmt(value, ".1f")


def _object_cell(m: dict[str, Any]) -> str:
    """The PSNR object cell: '–' for the baseline, the count where fewer videos than the row's have the figure."""
    if m["family"] == "baseline" or m.get("object_psnr") is None:
        return "–"
    text = "identical" if m["object_psnr"] == PSNR_CAP else _fmt(m["object_psnr"], ".1f", m["object_psnr_std"])
    counted = m.get("object_psnr_videos", m["videos"])
    return text + (f" ({counted} of {m['videos']} videos)" if counted < m["videos"] else "")


def plots(report: dict[str, Any], folder: Path) -> list[Path]:
    """pareto.png and motion.png; matplotlib's Agg backend (no display needed)."""
    from ..extras import need

    matplotlib = need("matplotlib", "Plotting benchmark results")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    rows = [m for m in report["methods"] if m["videos"] and m["family"] != "baseline" and m["speedup"]
            and m["psnr"] is not None]
    identical = [m["method"] for m in rows if m["psnr"] == PSNR_CAP]  # no finite PSNR to plot: named instead
    rows = [m for m in rows if m["psnr"] != PSNR_CAP]
    fig, ax = plt.subplots(figsize=(7, 5))
    families = list(dict.fromkeys(m["family"] for m in rows))
    for i, family in enumerate(families):
        mine = sorted((m for m in rows if m["family"] == family), key=lambda m: m["speedup"])
        xs, ys = [m["speedup"] for m in mine], [m["psnr"] for m in mine]
        style = "-o" if is_adacache_row({"family": family}) else "--s" if family == "static reuse" else ":^"
        spread = lambda key: [math.nan if m[key] is None else m[key] for m in mine]  # noqa: E731
        ax.errorbar(xs, ys, xerr=spread("speedup_std"), yerr=spread("psnr_std"), fmt=style,
                    capsize=2, label=family, color=f"C{i}")
        for m in mine:
            ax.annotate(m["method"], (m["speedup"], m["psnr"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    if identical:
        ax.text(0.01, 0.01, "identical to uncached (not drawn): " + ", ".join(identical), transform=ax.transAxes,
                fontsize=7, va="bottom")
    ax.set_xlabel("speed-up of the denoising loop (wall clock, x)")
    ax.set_ylabel("PSNR against the uncached video (dB)")
    s = report["settings"]
    ax.set_title(f"{s['model']}: {len(s['prompts'])} prompts x {len(s['seeds'])} seeds, {s['steps']} steps")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    written.append(_save(fig, folder / "pareto.png"))
    plt.close(fig)

    records = [r for r in report["records"] if r.get("status") == "ok"]
    baseline = {r["video"]: r for r in records if r["method"] == "none"}
    adaptive = [m["method"] for m in report["methods"] if m["videos"] and is_adacache_row(m)]
    fig, ax = plt.subplots(figsize=(7, 5))
    for i, name in enumerate(adaptive):
        pts = [(_motion_of(baseline[r["video"]]), r["computed_steps"]) for r in records
               if r["method"] == name and r["video"] in baseline and r.get("computed_steps") is not None]
        if pts:
            ax.scatter(*zip(*pts), label=name, s=14, alpha=0.7, color=f"C{i}")
    embedded = any("verifier" in r for r in records)
    ax.set_xlabel("measured motion of the uncached video (" + ("object speed, px/frame" if embedded
                                                                else "mean |frame difference|") + ")")
    ax.set_ylabel(f"computed steps (of {s['steps']})")
    ax.set_title("Not all videos are created equal: computed steps per video")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # no labelled points: no legend (matplotlib would warn)
        ax.legend(fontsize=8)
    written.append(_save(fig, folder / "motion.png"))
    plt.close(fig)
    return written


def _motion_of(record: dict[str, Any]) -> float:
    verifier = record.get("verifier")
    return verifier["speed_px"] if verifier and "speed_px" in verifier else record["motion"]


def _save(fig, path: Path) -> Path:
    tmp = path.with_name(f".{path.stem}.tmp.png")
    try:
        fig.savefig(tmp, dpi=120, bbox_inches="tight")
        tmp.replace(path)
    except OSError as error:
        raise BenchFolderError(f"{path} cannot be written ({error.strerror or error}); make it a writable file "
                               "(delete what is there) or pass another --out folder") from None
    return path


def write_report(settings: BenchSettings, records: list[dict[str, Any]], folder: Path,
                 command: str | None = None) -> dict[str, Any]:
    report = build_report(settings, records, command)
    write_atomic(folder / "report.json", json.dumps(finite(report), indent=1, allow_nan=False) + "\n")
    write_atomic(folder / "report.md", markdown(report))
    plots(report, folder)
    return report
