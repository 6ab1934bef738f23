"""Verdicts at matched speed-up, on hand-made method rows (no model): AdaCache's front is the upper envelope of its
points, read linearly in speed-up between neighbouring front points and never outside them; every peer point gets
the front's PSNR and SSIM there, the margins and a verdict; report.json and report.md carry them."""

import json

import pytest

from adacache.evaluation.folder import BenchSettings
from adacache.evaluation.report import PSNR_CAP, adacache_front, front_at, markdown, verdicts, write_report


def row(method, family, speedup, psnr, ssim=None, videos=2):
    return {"method": method, "family": family, "videos": videos, "speedup": speedup, "psnr": psnr, "ssim": ssim}


def test_the_front_is_the_upper_envelope_and_a_dominated_point_is_not_on_it():
    points = [(1.5, 40.0), (2.0, 38.0), (1.8, 37.0), (3.0, 30.0), (1.2, 39.0)]
    # (1.8, 37) is beaten by (2.0, 38): faster and better; (1.2, 39) by (1.5, 40)
    assert adacache_front(points) == [(1.5, 40.0), (2.0, 38.0), (3.0, 30.0)]
    assert adacache_front([]) == []


def test_ties_on_the_front_keep_the_best_at_one_speed_up_and_the_fastest_at_one_quality():
    assert adacache_front([(2.0, 35.0), (2.0, 37.0), (2.0, 36.0)]) == [(2.0, 37.0)]
    assert adacache_front([(1.5, 35.0), (2.5, 35.0), (2.0, 35.0)]) == [(2.5, 35.0)]
    assert adacache_front([(1.5, 40.0), (1.5, 40.0), (2.5, 30.0)]) == [(1.5, 40.0), (2.5, 30.0)]


def test_the_front_is_read_linearly_in_speed_up_and_never_extrapolated():
    front = [(1.5, 40.0), (2.0, 38.0), (3.0, 30.0)]
    assert front_at(front, 1.5) == 40.0 and front_at(front, 3.0) == 30.0  # its ends are inside
    assert front_at(front, 1.75) == pytest.approx(39.0)
    assert front_at(front, 2.25) == pytest.approx(36.0)  # a quarter of the way from 38 to 30
    assert front_at(front, 2.0) == 38.0
    for outside in (1.49, 3.01, 0.5, 10.0):
        assert front_at(front, outside) is None
    assert front_at([(2.0, 35.0)], 2.0) == 35.0 and front_at([(2.0, 35.0)], 2.1) is None
    assert front_at([], 2.0) is None


def test_each_peer_point_gets_front_values_margins_and_a_verdict():
    rows = [
        row("none", "baseline", None, None),
        row("auto", "AdaCache", 2.0, 38.0, 0.98),
        row("auto+moreg", "AdaCache + MoReg", 1.5, 40.0, 0.99),
        row("slow", "AdaCache", 1.4, 35.0, 0.995),  # dominated in PSNR, but on the SSIM front
        row("static:2", "static reuse", 1.75, 37.0, 0.97),  # static reuse is a peer, never on the front
        row("fbc:0.1", "FirstBlockCache", 1.9, 39.0, 0.985),
        row("pab:2", "PyramidAttentionBroadcast", 1.2, 45.0, 0.999),
        row("dbcache:0.1", "cache-dit DBCache", 1.6, 39.6, 0.99),
        row("fbc:0.5", "FirstBlockCache", 2.5, 20.0, 0.9, videos=0),  # not run: no verdict
    ]
    matched = verdicts(rows)
    assert matched["front"]["psnr"] == [[1.5, 40.0], [2.0, 38.0]]
    assert matched["front"]["ssim"] == [[1.4, 0.995], [1.5, 0.99], [2.0, 0.98]]
    by_name = {r["method"]: r for r in rows}
    static = by_name["static:2"]["verdict"]
    assert static["front_psnr"] == pytest.approx(39.0) and static["psnr_margin_db"] == pytest.approx(2.0)
    assert static["front_ssim"] == pytest.approx(0.985) and static["ssim_margin"] == pytest.approx(0.015)
    assert static["verdict"] == "AdaCache better by 2.0 dB" and static["outcome"] == "beats"
    fbc = by_name["fbc:0.1"]["verdict"]
    assert fbc["front_psnr"] == pytest.approx(38.4) and fbc["verdict"] == "peer better by 0.6 dB"
    assert by_name["fbc:0.1"]["adacache_psnr_at_speedup"] == pytest.approx(38.4)
    assert by_name["dbcache:0.1"]["verdict"]["outcome"] == "ties"  # 39.6 against 39.6 on the front
    pab = by_name["pab:2"]["verdict"]
    assert pab["front_psnr"] is None and pab["psnr_margin_db"] is None and pab["outcome"] == "outside"
    assert pab["verdict"] == "outside AdaCache's range (AdaCache points span 1.50-2.00x)"
    one = [row("auto", "AdaCache", 2.0, 38.0), row("fbc", "FirstBlockCache", 1.5, 40.0)]
    verdicts(one)
    assert one[1]["verdict"]["verdict"] == "outside AdaCache's range (AdaCache's front is one point, at 2.00x)"
    assert pab["front_ssim"] is None  # 1.2x is below the SSIM front's 1.4x too
    for name in ("none", "auto", "auto+moreg", "slow", "fbc:0.5"):
        assert "verdict" not in by_name[name]
    assert matched["summary"] == {"beats": 1, "loses": 1, "ties": 1, "outside": 1}


def test_without_adacache_points_every_peer_is_outside():
    rows = [row("none", "baseline", None, None), row("fbc", "FirstBlockCache", 1.5, 40.0, 0.99)]
    matched = verdicts(rows)
    assert rows[1]["verdict"]["verdict"] == "no AdaCache point to compare with"
    assert matched["summary"]["outside"] == 1 and matched["span"] is None


def test_an_identical_peer_counts_at_the_psnr_cap():
    rows = [row("auto", "AdaCache", 1.0, 60.0, 1.0), row("auto-2", "AdaCache", 2.0, 40.0, 0.99),
            row("fbc:1e-4", "FirstBlockCache", 1.0, PSNR_CAP, 1.0)]
    verdicts(rows)
    assert rows[2]["verdict"]["verdict"] == "peer better by 40.0 dB"


def _records():
    """Two videos; AdaCache at 1.5x/40 dB and 2.5x/34 dB, a peer at 2x/35 dB and one at 3x (outside); SSIM is
    PSNR / 40."""
    records = []
    points = {"none": (1.0, None), "auto": (1.5, 40.0), "opensora-30-fast": (2.5, 34.0), "fbc:0.1": (2.0, 35.0),
              "static:3": (3.0, 30.0)}
    families = {"none": "baseline", "auto": "AdaCache", "opensora-30-fast": "AdaCache", "fbc:0.1": "FirstBlockCache",
                "static:3": "static reuse"}
    for video in ("p000-s0", "p001-s0"):
        for name, (speedup, quality) in points.items():
            records.append({"video": video, "method": name, "family": families[name], "status": "ok",
                            "seconds": 1.0 / speedup, "speedup": None if name == "none" else speedup,
                            "psnr": quality, "ssim": None if quality is None else quality / 40, "flops": None,
                            "flops_fraction": None, "cache_bytes": None, "peak_memory_bytes": None, "motion": 0.1})
    return records


def test_report_json_and_markdown_carry_the_verdicts(tmp_path):
    pytest.importorskip("matplotlib")
    settings = BenchSettings(model="hand-made", prompts=["a", "b"], methods=list({r["method"]: 0 for r in _records()}),
                             steps=30, warmup=0)
    report = write_report(settings, _records(), tmp_path)
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["verdicts"]["summary"] == {"beats": 1, "loses": 0, "ties": 0, "outside": 1}
    fbc = {m["method"]: m for m in saved["methods"]}["fbc:0.1"]["verdict"]
    assert fbc["front_psnr"] == pytest.approx(37.0) and fbc["psnr_margin_db"] == pytest.approx(2.0)
    assert fbc["front_ssim"] == pytest.approx(0.925) and fbc["ssim_margin"] == pytest.approx(0.05)
    text = (tmp_path / "report.md").read_text()
    assert text == markdown(report)
    assert "## Verdicts at matched speed-up" in text
    assert ("| fbc:0.1 | FirstBlockCache | 2.00x | 35.0 | 37.0 | +2.0 | 0.875 | 0.925 | +0.050 | "
            "AdaCache better by 2.0 dB |") in text
    assert "| static:3 | static reuse | 3.00x | 30.0 | – | – | 0.750 | – | – | outside AdaCache's range " \
           "(AdaCache points span 1.50-2.50x) |" in text
    assert ("On PSNR at matched speed-up, the AdaCache front beats 1 of 2 peer points and loses to 0; 1 lies outside "
            "its range (AdaCache points span 1.50-2.50x).") in text
    assert "| 37.0 (AdaCache better) |" in text  # the main table's column, from the same verdict


def test_wall_speedup_is_compared_with_the_compute_speedup():
    from adacache.evaluation.report import aggregate

    records = [{"video": f"v{i}", "method": "auto", "family": "AdaCache", "status": "ok", "seconds": 1.0,
                "speedup": wall, "steps": 30, "computed_steps": 10} for i, wall in enumerate((2.7, 2.85))]
    records.append({"video": "v0", "method": "fbc:0.1", "family": "FirstBlockCache", "status": "ok", "seconds": 1.0,
                    "speedup": 1.5})  # no computed steps: no compute speed-up claimed
    rows = {r["method"]: r for r in aggregate(records, ["auto", "fbc:0.1"])}
    assert rows["auto"]["compute_speedup"] == pytest.approx(3.0)
    assert rows["auto"]["wall_to_compute"] == pytest.approx((0.9 + 0.95) / 2)
    assert rows["fbc:0.1"]["compute_speedup"] is None and rows["fbc:0.1"]["wall_to_compute"] is None
