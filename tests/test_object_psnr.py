"""PSNR over the object's pixels (metrics.object_psnr, background_share) and its column in bench records and reports."""

import json
import math

import numpy as np
import pytest

from adacache.embedded.train import build_pipeline
from adacache.evaluation.bench import Bench, BenchSettings, load_records, run_bench
from adacache.evaluation.metrics import background_share, object_mask, object_psnr, psnr
from adacache.evaluation.report import PSNR_CAP, build_report, markdown


def _dot_video() -> np.ndarray:
    """One 5 x 5 frame, black but for a red pixel at (2, 2): the mask is the 3 x 3 square around it (9 of 25)."""
    video = np.zeros((1, 5, 5, 3))
    video[0, 2, 2, 0] = 1.0
    return video


# --- the mask ----------------------------------------------------------------------------------------------------
def test_the_mask_is_the_pixels_above_the_threshold_dilated_by_one_pixel():
    mask = object_mask(_dot_video())
    expected = np.zeros((1, 5, 5), bool)
    expected[0, 1:4, 1:4] = True
    assert (mask == expected).all()
    assert background_share(_dot_video()) == pytest.approx(16 / 25)
    assert (object_mask(_dot_video(), dilate=0) == (np.arange(25).reshape(1, 5, 5) == 12)).all()


def test_any_channel_counts_and_the_threshold_is_strict():
    video = np.zeros((1, 5, 5, 3))
    video[0, 0, 4, 2] = 0.05  # at the threshold: background
    video[0, 4, 0, 1] = 0.06  # above it in one channel: object
    mask = object_mask(video, dilate=0)
    assert mask.sum() == 1 and mask[0, 4, 0]


def test_dilation_stays_in_its_frame_and_does_not_wrap():
    video = np.zeros((2, 4, 4, 3))
    video[0, 0, 0] = 1.0  # a corner of frame 0; frame 1 is black
    mask = object_mask(video)
    assert mask[0].sum() == 4 and mask[0, :2, :2].all()  # the corner's 2 x 2, not the opposite edges
    assert not mask[1].any()
    assert background_share(video) == pytest.approx(1 - 4 / 32)


# --- object_psnr -------------------------------------------------------------------------------------------------
def test_an_error_on_the_object_counts_over_the_masked_pixels_only():
    reference = _dot_video()
    other = reference.copy()
    other[0, 2, 2, 1] = 0.1  # squared error 0.01 in one of the 9 x 3 masked values, one of the 25 x 3 of the frame
    assert object_psnr(reference, other) == pytest.approx(10 * math.log10(27 / 0.01))
    assert psnr(reference, other) == pytest.approx(10 * math.log10(75 / 0.01))
    assert object_psnr(reference, other) < psnr(reference, other)


def test_an_error_on_the_background_only_leaves_the_object_identical():
    reference = _dot_video()
    other = reference.copy()
    other[0, 0, 0] = 0.5  # outside the dilated mask
    assert object_psnr(reference, other) == math.inf
    assert math.isfinite(psnr(reference, other))


def test_the_mask_comes_from_the_reference_only():
    reference = _dot_video()
    other = reference.copy()
    other[0, 4, 4] = 1.0  # an object the cached video made up, outside the reference's mask
    assert object_psnr(reference, other) == math.inf
    # the other way round the made-up pixel is masked: 9 + 4 - 1 (shared (3, 3)) = 12 pixels, 3 of 36 values off by 1
    assert object_psnr(other, reference) == pytest.approx(10 * math.log10(36 / 3))


def test_an_all_black_reference_has_no_object_psnr():
    black = np.zeros((2, 4, 4, 3))
    assert object_psnr(black, np.full_like(black, 0.5)) is None
    assert background_share(black) == 1.0


def test_inputs_that_are_not_normalised_videos_are_refused():
    video = _dot_video()
    with pytest.raises(ValueError, match="dtype uint8; expected floats in \\[0, 1\\]"):
        object_psnr((video * 255).astype(np.uint8), video)
    with pytest.raises(ValueError, match="expected a video \\(T, H, W, 3\\)"):
        object_psnr(video.transpose(0, 3, 1, 2), video.transpose(0, 3, 1, 2))
    with pytest.raises(ValueError, match="videos differ in shape"):
        object_psnr(video, video[:, :4])
    with pytest.raises(ValueError, match="threshold"):
        object_mask(video, threshold=5)


# --- in the bench ------------------------------------------------------------------------------------------------
def _settings(**overrides):
    values = dict(model="tiny", prompts=["a red circle moving left fast", "a blue square standing still"],
                  methods=["none", "static:2"], seeds=[0], steps=4, guidance=4.0, warmup=0, flops=False)
    return BenchSettings(**{**values, **overrides})


def test_the_bench_records_and_reports_object_psnr_on_the_embedded_model(tmp_path):
    report = run_bench(build_pipeline("tiny", architecture="wan"), _settings(), tmp_path, progress=False)
    records = {(r["video"], r["method"]): r for r in load_records(tmp_path)}
    for vid in ("p000-s0", "p001-s0"):
        cached = records[(vid, "static:2")]
        assert cached["object_psnr"] is not None or cached["object_identical"]
        assert "object_psnr" not in records[(vid, "none")]  # the baseline is the reference
    row = {m["method"]: m for m in report["methods"]}["static:2"]
    assert row["object_psnr_videos"] == 2 and row["object_psnr"] is not None
    saved = json.loads((tmp_path / "report.json").read_text())
    assert {m["method"]: m for m in saved["methods"]}["static:2"]["object_psnr"] == pytest.approx(row["object_psnr"])
    text = (tmp_path / "report.md").read_text()
    head = next(line for line in text.splitlines() if line.startswith("| Method"))
    assert "| PSNR ↑ | PSNR object ↑ | SSIM ↑ |" in head


def test_older_records_without_the_field_resume_and_report(tmp_path):
    pipe = build_pipeline("tiny", architecture="wan")
    settings = _settings()
    run_bench(pipe, settings, tmp_path, progress=False)
    path = tmp_path / "records.rank0.jsonl"
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    for record in lines:  # as an older version wrote them
        record.pop("object_psnr", None)
        record.pop("object_identical", None)
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    report = run_bench(pipe, settings, tmp_path, progress=False)
    assert [json.loads(line) for line in path.read_text().splitlines()] == lines  # nothing measured again
    row = {m["method"]: m for m in report["methods"]}["static:2"]
    assert row["object_psnr"] is None and row["object_psnr_videos"] == 0 and row["psnr"] is not None
    assert "PSNR object" not in (tmp_path / "report.md").read_text()


def test_a_damaged_object_psnr_is_measured_again(tmp_path):
    pipe = build_pipeline("tiny", architecture="wan")
    settings = _settings(prompts=["a red circle moving left fast"])
    run_bench(pipe, settings, tmp_path, progress=False)
    path = tmp_path / "records.rank0.jsonl"
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    lines[-1]["object_psnr"] = "high"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    run_bench(pipe, settings, tmp_path, progress=False)
    record = {r["method"]: r for r in load_records(tmp_path)}["static:2"]
    assert record["object_psnr"] is None or isinstance(record["object_psnr"], float)
    assert len(path.read_text().splitlines()) == 3  # the damaged line, and its new measurement


def test_other_models_record_none(tmp_path):
    bench = Bench(build_pipeline("tiny", architecture="wan"), _settings(prompts=["a red circle moving left fast"]),
                  tmp_path, progress=False)
    bench.embedded = False  # as for a diffusers pipeline
    bench.check_settings()
    records = {r["method"]: r for r in bench.run()}
    assert records["static:2"]["object_psnr"] is None and records["static:2"]["object_identical"] is False
    assert records["static:2"]["psnr"] is not None or records["static:2"]["identical"]


def test_the_report_caps_identical_objects_and_counts_videos_with_the_figure():
    settings = _settings(prompts=["a", "b", "c"])
    ok = dict(status="ok", family="static reuse", method="static:2", seconds=1.0, psnr=30.0, ssim=0.9)
    records = [{"video": "v0", "method": "none", "family": "baseline", "status": "ok", "seconds": 2.0},
               {**ok, "video": "v0", "object_psnr": 20.0, "object_identical": False},
               {**ok, "video": "v1", "object_psnr": None, "object_identical": True},
               {**ok, "video": "v2"}]  # an older record: no figure
    report = build_report(settings, records)
    row = {m["method"]: m for m in report["methods"]}["static:2"]
    assert row["object_psnr"] == pytest.approx((20.0 + PSNR_CAP) / 2) and row["object_psnr_videos"] == 2
    line = next(x for x in markdown(report).splitlines() if x.startswith("| static:2 |"))
    assert "| 30.0 | 60.0 ± 56.6 (2 of 3 videos) | 0.900 |" in line
