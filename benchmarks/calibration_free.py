"""Issue 21's targets for AdaCache without calibration, read from `adacache bench` reports.

    python benchmarks/calibration_free.py runs/cf-embedded-30 runs/cf-embedded-50 ...   # report folders

Each folder is one bench run (one model, one step count; `benchmarks/calibration_free.sh` makes them) holding the
calibration-free settings (default, speedup:<x>, the presets quality/balanced/fast; with +moreg), the model's
calibrated front where it has one (config files, family "AdaCache"), and peers at their own defaults. Prints, per
run:
- each setting's compute speed-up (steps / computed steps, mean per video) against the one it promises (target:
  within 15%), its PSNR, and the calibrated front's PSNR at the same compute speed-up (linear between the two
  neighbouring front points, never extrapolated; target: within 1.5 dB);
- MoReg: computed steps of fast over still prompts (target: at least 1.5x), and its PSNR against the plain
  default's at the same compute speed-up (target: at least as high);
- every peer at its default setting against the default's curve at the peer's compute speed-up (1 / its FLOP
  fraction where the bench counted FLOPs): the margin in dB (target: the default at least level).
PSNR: the bench's, peak 1.0 on frames scaled to [0, 1].
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

NAMED = {"default": 2.0, "balanced": 2.0, "quality": 1.5, "fast": 3.0}


def promised(name: str) -> float | None:
    """The speed-up a calibration-free method name promises (None for anything else)."""
    base = name.removesuffix("+moreg")
    if base in NAMED:
        return NAMED[base]
    if base.startswith("speedup:"):
        return float(base.partition(":")[2])
    return None


def compute_speedup(method: dict) -> float | None:
    if method.get("family", "").startswith("AdaCache") or method.get("family") == "static reuse":
        return method.get("compute_speedup")
    fraction = method.get("flops_fraction")
    return 1 / fraction if fraction else method.get("compute_speedup")


def interpolate(points: list[tuple[float, float]], x: float) -> float | None:
    """Linear between the neighbouring points of an upper envelope in x; None outside their range."""
    points = sorted(points)
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    if points and math.isclose(points[-1][0], x, rel_tol=1e-9):
        return points[-1][1]
    return None


def envelope(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The upper envelope (Pareto front) of (speed-up, PSNR) points: no other point is both faster and better."""
    front = []
    for x, y in sorted(points, key=lambda p: (-p[0], -p[1])):
        if not front or y > front[-1][1]:
            front.append((x, y))
    return sorted(front)


def fmt(value: float | None, spec: str = ".2f", suffix: str = "") -> str:
    return "–" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:{spec}}{suffix}"


def report(folder: Path) -> None:
    data = json.loads((folder / "report.json").read_text())
    settings, methods = data["settings"], [m for m in data["methods"] if not m.get("skipped_all")]
    steps, model = settings["steps"], settings["model"]
    by_name = {m["method"]: m for m in methods if m.get("psnr") is not None or m["method"] == "none"}
    free = {name: m for name, m in by_name.items() if promised(name) is not None and not name.endswith("+moreg")}
    calibrated = [m for m in by_name.values() if m.get("family", "").startswith("AdaCache")
                  and promised(m["method"]) is None and m["method"] not in ("auto", "auto+moreg")
                  and "MoReg" not in m["family"] and math.isfinite(m["psnr"])]
    # the front of the default's own store (plain reuse), and the front of every store (the forecast store too)
    front = envelope([(compute_speedup(m), m["psnr"]) for m in calibrated if m["family"] == "AdaCache"])
    any_store = envelope([(compute_speedup(m), m["psnr"]) for m in calibrated])
    curve = sorted((compute_speedup(m), m["psnr"]) for m in free.values() if math.isfinite(m["psnr"]))
    print(f"\n## {model}, {steps} steps ({folder}; {len(settings['prompts'])} prompts x seeds {settings['seeds']})")
    forecast = len(any_store) and any_store != front
    print("| setting | promised | compute speed-up | off by | PSNR dB | calibrated front (reuse) at that speed-up | "
          "margin |" + (" front of any store (forecast too) | margin |" if forecast else ""))
    print("|---|---|---|---|---|---|---|" + ("---|---|" if forecast else ""))
    for name, m in sorted(free.items(), key=lambda item: promised(item[0])):
        reached, target = compute_speedup(m), promised(name)
        row = f"| {name} | {target:g}x | {reached:.2f}x | {100 * (reached / target - 1):+.0f}% | {m['psnr']:.2f} |"
        for points in (front, any_store) if forecast else (front,):
            at = interpolate(points, reached)
            row += f" {fmt(at)} | {fmt(None if at is None else m['psnr'] - at, '+.2f', ' dB')} |"
        print(row)
    moreg = {name: m for name, m in by_name.items() if promised(name) is not None and name.endswith("+moreg")}
    if moreg:
        print("\n| MoReg setting | compute speed-up | computed steps still / slow / fast | fast over still | PSNR dB | "
              "plain default at that speed-up | margin |")
        print("|---|---|---|---|---|---|---|")
        for name, m in moreg.items():
            by_speed = m.get("computed_steps_by_speed") or {}
            still, fast = by_speed.get("still"), by_speed.get("fast")
            reached = compute_speedup(m)
            plain = interpolate(curve, reached)
            print(f"| {name} | {reached:.2f}x | {fmt(still, '.1f')} / {fmt(by_speed.get('slow'), '.1f')} / "
                  f"{fmt(fast, '.1f')} | {fmt(fast / still if still and fast else None, '.2f', 'x')} | "
                  f"{m['psnr']:.2f} | {fmt(plain)} | {fmt(None if plain is None else m['psnr'] - plain, '+.2f', ' dB')} |")
    peers = {name: m for name, m in by_name.items() if not m.get("family", "").startswith("AdaCache")
             and m["method"] != "none" and m.get("family") != "static reuse"}
    if peers:
        print("\n| peer at its default | compute speed-up | PSNR dB | the default's curve there | margin (default - peer) |")
        print("|---|---|---|---|---|")
        for name, m in peers.items():
            reached = compute_speedup(m)
            ours = interpolate(curve, reached) if reached is not None else None
            print(f"| {name} ({m['family']}) | {fmt(reached, '.2f', 'x')} | {fmt(m['psnr'])} | "
                  f"{fmt(ours) if ours is not None else 'outside the default range'} | "
                  f"{fmt(None if ours is None else ours - m['psnr'], '+.2f', ' dB')} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path)
    for folder in parser.parse_args().folders:
        report(folder)


if __name__ == "__main__":
    main()
