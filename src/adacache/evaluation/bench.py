"""`adacache bench`: a prompt set x seeds, every method on the same model, steps and seeds, in one process.

For each video (prompt, seed) the methods run one after the other (baseline first), so a machine that slows down
or speeds up mid-run hits all of them alike. Per video and method it records the denoising loop's wall time
(median of `repeats`, after one warm-up generation per method), the transformer FLOPs (a separate counted pass),
the cache's memory, PSNR/SSIM (and LPIPS when available) against the baseline video of the same seed, and on the
embedded model the verifier's reading and `object_psnr`, the PSNR over the pixels where the baseline shows the
object (metrics.object_psnr; its black background, most of each frame, lifts the whole-frame PSNR). Other models
record object_psnr as None: their videos have no black background to leave out. Records are appended to
`records.rank<R>.jsonl` as they finish, and the baseline videos are kept in `videos/`, so an interrupted run
resumes where it stopped (records written before object_psnr existed lack it: read as None). Under torchrun the videos
shard over the processes; rank 0 merges every rank's records into the report (`report.json`, `report.md`,
`pareto.png`, `motion.png`).

A damaged folder is recovered where that gives the same results, else refused before any work with the file and
what to do (`BenchFolderError`, a ValueError): a records line cut short or not a record is measured again; a
baseline video that is missing or unreadable is generated again and checked against its record; a video whose
baseline record is lost is measured again with every method; run.json that is not the settings object, records
without run.json, and a folder where a file belongs (or a file where a folder belongs) are refused.

The bench knows a method only through `methods.Method`: apply, remove, unsupported (a reason: the method is
recorded as skipped), held_bytes (read after the generation, or after every transformer call of the untimed pass
for methods that drop their state at the end of a call), stats (record fields such as computed_steps), describe,
and its flags is_baseline, watch_memory_live and runs_under_context_parallelism.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import statistics
import tempfile
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..hooks import transformers_of
from ..pipelines import first_video
from .folder import BenchFolderError, BenchSettings, finite, refuse, write_atomic
from .methods import Method, parse_methods
from .metrics import LPIPS, TransformerMeter, as_video, frame_motion, object_psnr, psnr, ssim
from .report import write_report

__all__ = ["Bench", "BenchFolderError", "BenchSettings", "check_folder", "finite", "load_records", "prepare_folder",
           "read_prompts", "run_bench", "write_atomic"]

logger = logging.getLogger(__name__)


def read_prompts(path: str | os.PathLike) -> list[str]:
    """One prompt per line; blank lines and lines starting with # are skipped."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"cannot read the prompt file {str(path)!r}: {error}") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise ValueError(f"the prompt file {str(path)!r} holds no prompts; write one prompt per line")
    return prompts


def prepare_folder(out: str | os.PathLike) -> Path:
    """Create the output folder and check it can be written, before any work."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".adacache-write-test-"):
            pass
    except OSError as error:
        raise ValueError(f"cannot write to the output folder {str(out)!r}: {error.strerror or error}") from None
    return out


# Files a bench writes in its folder (records.rank<R>.jsonl and videos/<id>.npy besides), each checked to be a file.
_FOLDER_FILES = ("run.json", "report.json", "report.md", "pareto.png", "motion.png")


def check_folder(out: Path) -> None:
    """Refuse, before any work, a folder where a file belongs or a file where the videos folder belongs."""
    paths = [out / name for name in _FOLDER_FILES] + sorted(out.glob("records.rank*.jsonl"))
    videos = out / "videos"
    if videos.exists() and not videos.is_dir():
        raise refuse(videos, "is not a folder (the bench keeps its baseline videos there)",
                     "delete it, or pass another --out folder")
    if videos.is_dir():
        paths += sorted(videos.glob("*.npy"))
    for path in paths:
        if path.exists() and not path.is_file():
            raise refuse(path, "is not a file (the bench writes a file there)",
                         "delete it, or pass another --out folder")


class Bench:
    """Runs a `BenchSettings` on a pipeline into a folder; `run()` returns this process's records."""

    def __init__(self, pipe: Any, settings: BenchSettings, out: str | os.PathLike, *, tuned: Any = None,
                 rank: int = 0, world: int = 1, progress: bool = True) -> None:
        self.pipe, self.settings, self.rank, self.world, self.progress = pipe, settings, rank, world, progress
        self.methods: list[Method] = parse_methods(settings.methods, tuned)
        # under context parallelism every process runs every video, together; rank 0 alone writes
        self.together = settings.context_parallel != "none"
        videos = settings.videos()
        if world > len(videos) and not self.together:
            raise ValueError(
                f"{world} processes for {len(videos)} videos (prompts x seeds): use at most {len(videos)} processes"
            )
        self.videos = videos if self.together else videos[rank::world]
        self.writes = rank == 0 or not self.together
        self.out = prepare_folder(out)
        check_folder(self.out)
        (self.out / "videos").mkdir(exist_ok=True)
        self.embedded = type(pipe).__name__ == "EmbeddedVideoPipeline"
        self.lpips: LPIPS | None = None

    # -- the run --
    def check_settings(self) -> None:
        """Save run.json, or check that the folder's run has the same settings (then it resumes)."""
        path = self.out / "run.json"
        # what the names stood for (a config file or the shipped codebook may change between sittings) and which
        # weights ran: a resumed run must compare like with like
        mine = {**dataclasses.asdict(self.settings), "resolved_methods": [m.describe() for m in self.methods],
                "weights_fingerprint": _fingerprint(self.pipe)}
        check_folder(self.out)
        expected = json.loads(json.dumps(mine))
        remedy = f"delete the folder {self.out} (a new run starts there) or pass another --out folder"
        if path.is_file():
            try:
                theirs = json.loads(path.read_bytes().decode("utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
                raise refuse(path, f"is not a readable settings file ({error}), so the records beside it cannot be "
                                   "matched to settings", remedy) from None
            if not isinstance(theirs, dict) or not set(theirs) & set(expected):
                raise refuse(path, f"holds {type(theirs).__name__} JSON, not the settings a bench writes, so the "
                                   "records beside it cannot be matched to settings", remedy)
            theirs.setdefault("context_parallel", "none")  # written before the option: the videos were shared out
            if theirs != expected:
                changed = sorted(k for k in set(expected) | set(theirs) if expected.get(k) != theirs.get(k))
                raise ValueError(
                    f"{self.out} holds a run with other settings ({', '.join(changed)} differ); resume it with the "
                    "same settings, or pass another --out folder"
                )
        else:
            written = [p for p in self.out.glob("records.rank*.jsonl") if p.stat().st_size]
            if written:
                raise refuse(path, f"is missing, but {written[0].name} holds records: the settings they were "
                                   "measured with are unknown", remedy)
            if self.rank == 0:
                write_atomic(path, json.dumps(mine, indent=2) + "\n")

    def run(self) -> list[dict[str, Any]]:
        from ..extras import need

        tqdm = need("tqdm.auto", "adacache bench").tqdm
        records = load_records(self.out)
        done = {(r["video"], r["method"]) for r in records if r.get("status") in ("ok", "skipped")}
        # a video whose baseline record is lost is measured again with every method, so that its speed-ups all
        # refer to one baseline time
        done = {(vid, name) for vid, name in done if (vid, "none") in done}
        todo = [(v, m) for v in self.videos for m in self.methods if (v[0], m.name) not in done]
        if not todo:
            logger.info("every video and method of this shard is already measured")
            return [r for r in records if r["video"] in {v[0] for v in self.videos}]
        self.lpips = LPIPS()
        if not self.lpips.available:
            logger.warning("LPIPS not computed: %s", self.lpips.reason)
        self.pipe.set_progress_bar_config(disable=True)
        records_path = self.out / f"records.rank{self.rank}.jsonl"
        if self.writes:
            _drop_unfinished_line(records_path)
        try:
            sink = records_path.open("a") if self.writes else contextlib.nullcontext()  # (rank 0 writes them)
        except OSError as error:
            raise refuse(records_path, f"cannot be appended to ({error.strerror or error})",
                         "make it a writable file or pass another --out folder") from None
        bar = tqdm(total=len(todo), desc=f"bench (rank {self.rank})" if self.world > 1 else "bench",
                   disable=not self.progress)
        with TransformerMeter(transformers_of(self.pipe)) as meter, sink:
            self.meter = meter
            self._warm_up(todo)
            for video in self.videos:
                pending = [m for m in self.methods if (video[0], m.name) not in done]
                if not pending:
                    continue
                reference = self._reference(video, sink, records)
                for method in pending:
                    if not method.is_baseline:  # the baseline's record is written by _reference
                        bar.set_postfix_str(f"{video[0]} {method.name}")
                        _append(sink, self._measure(video, method, reference))
                    bar.update(1)
        bar.close()
        return [r for r in load_records(self.out) if r["video"] in {v[0] for v in self.videos}]

    def _generate(self, prompt: str, seed: int) -> np.ndarray:
        output = self.pipe(prompt, num_inference_steps=self.settings.steps, guidance_scale=self.settings.guidance,
                           generator=torch.Generator().manual_seed(seed), **self.settings.call)
        video = as_video(first_video(output))
        if not np.isfinite(video).all():
            raise FloatingPointError("the video holds non-finite values (NaN or inf)")
        return video.astype(np.float16)  # what is stored and compared: both sides alike

    def _warm_up(self, todo: list) -> None:
        if not self.settings.warmup:
            return
        _, _, prompt, seed = todo[0][0]
        for method in self.methods:
            if self._unsupported(method):
                continue
            try:
                self._with(method, lambda: [self._generate(prompt, seed) for _ in range(self.settings.warmup)])
            except Exception:  # noqa: BLE001 - reported when the method is measured
                pass

    def _unsupported(self, method: Method) -> str | None:
        if self.together and not method.runs_under_context_parallelism:
            return ("under context parallelism the bench runs the uncached model and AdaCache only: AdaCache stays "
                    "applied inside diffusers' split (changing configs with reconfigure), where another cache "
                    "cannot be enabled and removed around it")
        return method.unsupported(self.pipe, self.settings.guidance, self.settings.steps)

    def _with(self, method: Method, work):
        try:  # a method that fails to enable on a second transformer must not stay on the first
            method.apply(self.pipe, self.settings.steps, run=lambda: self._generate(*self._first_video()),
                         guidance=self.settings.guidance)
            return work()
        finally:
            method.remove(self.pipe)

    def _first_video(self) -> tuple[str, int]:
        """The whole run's first video (not this shard's): what set-up runs (MagCache's calibration) use, so
        results do not depend on the number of processes."""
        _, _, prompt, seed = self.settings.videos()[0]
        return prompt, seed

    def _timed(self, method: Method, prompt: str, seed: int
               ) -> tuple[np.ndarray, list[float], dict[str, Any], int | None]:
        """Generate `repeats` times, the method applied afresh each time (some caches keep state across
        generations): the frames, the method's stats (record fields) and held memory of the first, every wall
        time. The memory is read here for methods whose state outlives the generation (AdaCache's peak), else in
        `_counted`."""
        seconds, video, stats, held = [], None, {}, None
        for i in range(self.settings.repeats):

            def generate() -> tuple[np.ndarray, dict[str, Any], int | None]:
                self.meter.reset()  # here, so that a method's own set-up run (MagCache's calibration) is not timed
                if torch.cuda.is_available():
                    torch.cuda.reset_peak_memory_stats()
                frames = self._generate(prompt, seed)
                if i:  # only the first repeat's stats and memory are kept
                    return frames, {}, None
                return (frames, method.stats(self.pipe),
                        None if method.watch_memory_live else method.held_bytes(self.pipe))

            frames, first_stats, first_held = self._with(method, generate)
            seconds.append(self.meter.seconds)
            if video is None:
                video, stats, held = frames, first_stats, first_held
        return video, seconds, stats, held

    def _counted(self, method: Method, prompt: str, seed: int) -> tuple[int | None, int | None]:
        """An untimed pass with the method applied: the transformer FLOPs (when the settings ask for them) and, for
        methods that drop their state at the end of a pipeline call (`Method.watch_memory_live`), the most memory
        they held after any transformer call, read during the generation."""
        peak_held, handles = None, []
        if method.watch_memory_live:
            peak_held = 0

            def watch(module, args, output):
                nonlocal peak_held
                peak_held = max(peak_held, method.held_bytes(self.pipe) or 0)

            handles = [m.register_forward_hook(watch) for m in transformers_of(self.pipe)]
        elif not self.settings.flops:
            return None, None

        def work() -> int | None:
            self.meter.reset(count_flops=self.settings.flops)
            self._generate(prompt, seed)
            flops = self.meter.flops if self.settings.flops else None
            self.meter.reset()
            return flops

        try:
            flops = self._with(method, work)
        finally:
            for handle in handles:
                handle.remove()
        return flops, peak_held

    def _reference(self, video: tuple, sink, records: list[dict[str, Any]]) -> dict[str, Any]:
        """The baseline's frames and record for `video`: loaded if measured before, else measured now."""
        vid, index, prompt, seed = video
        path = self.out / "videos" / f"{vid}.npy"
        previous = [r for r in records if r["video"] == vid and r["method"] == "none" and r.get("status") == "ok"]
        if previous:
            return {"frames": self._stored_baseline(path, previous[-1], prompt, seed), "record": previous[-1]}
        frames, seconds, _, _ = self._timed(self.methods[0], prompt, seed)
        peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
        flops, _ = self._counted(self.methods[0], prompt, seed)
        if self.writes:
            _save_video(path, frames)
        record = self._record(video, self.methods[0], frames, seconds, flops, {}, peak, None, reference=None)
        _append(sink, record)
        return {"frames": frames, "record": record}

    def _stored_baseline(self, path: Path, record: dict[str, Any], prompt: str, seed: int) -> np.ndarray:
        """The baseline video measured before. One that is missing, unreadable or not the video its record
        describes is generated again (its recorded time kept) and must then match the record."""
        frames, problem = _load_video(path)
        if frames is not None and not _matches(frames, record):
            frames, problem = None, "is not the video its baseline record describes (its motion differs)"
        if frames is not None:
            return frames
        logger.warning("%s %s: generating the baseline video again (its recorded time is kept)", path, problem)
        frames = self._generate(prompt, seed)
        if not _matches(frames, record):
            raise refuse(path, f"{problem}, and generating it again gave another video than the one the records of "
                               f"{record['video']} were measured against (motion {frame_motion(frames):.6g}, recorded "
                               f"{record.get('motion')})",
                         f"delete the folder {self.out} or pass another --out folder")
        if self.writes:
            _save_video(path, frames)
        return frames

    def _measure(self, video: tuple, method: Method, reference: dict[str, Any]) -> dict[str, Any]:
        vid, index, prompt, seed = video
        base = {"video": vid, "prompt_index": index, "prompt": prompt, "seed": seed, "method": method.name,
                "family": method.family}
        reason = self._unsupported(method)
        if reason:
            return {**base, "status": "skipped", "reason": reason}
        try:
            frames, seconds, stats, cache_bytes = self._timed(method, prompt, seed)
            peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
            flops, held = self._counted(method, prompt, seed)
            cache_bytes = held if held is not None else cache_bytes
        except Exception as error:  # noqa: BLE001 - one method's failure must not end the whole run
            logger.warning("%s failed on %s: %s", method.name, vid, error)
            return {**base, "status": "failed", "reason": f"{type(error).__name__}: {error}",
                    "traceback": traceback.format_exc(limit=6)}
        return self._record(video, method, frames, seconds, flops, stats, peak, cache_bytes, reference)

    def _record(self, video, method, frames, seconds, flops, stats, peak, cache_bytes, reference) -> dict[str, Any]:
        vid, index, prompt, seed = video
        record: dict[str, Any] = {
            "video": vid, "prompt_index": index, "prompt": prompt, "seed": seed, "method": method.name,
            "family": method.family, "status": "ok",
            "seconds": statistics.median(seconds), "seconds_all": seconds, "flops": flops,
            "peak_memory_bytes": peak, "cache_bytes": cache_bytes, "motion": frame_motion(frames),
        }
        record.update(stats)  # what the method reports of itself: computed_steps, steps, its own details
        if reference is not None:
            ref = reference["record"]
            a, b = reference["frames"].astype(np.float32), frames.astype(np.float32)
            quality = psnr(a, b)
            record.update(
                psnr=quality if math.isfinite(quality) else None, identical=quality == math.inf, ssim=ssim(a, b),
                lpips=self.lpips(a, b) if self.lpips else None,
                speedup=ref["seconds"] / record["seconds"] if record["seconds"] > 0 else None,
                flops_fraction=flops / ref["flops"] if flops is not None and ref.get("flops") else None,
            )
            # None off the embedded model, and where the baseline is all black (no object to measure over);
            # inf (identical object pixels) is recorded as None with object_identical, as psnr is
            on_object = object_psnr(a, b) if self.embedded else None
            record.update(object_psnr=on_object if on_object is not None and math.isfinite(on_object) else None,
                          object_identical=on_object == math.inf)
        if self.embedded:
            record["verifier"] = _verify(frames, prompt)
        return record


def _fingerprint(pipe: Any) -> str:
    """A short hash of the transformers' weights (their values, not their names)."""
    import hashlib

    digest = hashlib.sha256()
    for model in transformers_of(pipe):
        for name, tensor in sorted(model.state_dict().items()):
            digest.update(name.encode())
            head = tensor.detach().flatten()[:1024]  # no full copy of a large model's weights
            digest.update(head.float().cpu().numpy().tobytes())
            digest.update(repr(float(tensor.detach().sum(dtype=torch.float64))).encode())
    return digest.hexdigest()[:16]


def _load_video(path: Path) -> tuple[np.ndarray | None, str | None]:
    """(frames, None), or (None, what is wrong with the file)."""
    if not path.exists():
        return None, "is missing"
    try:
        frames = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as error:
        return None, f"cannot be read ({type(error).__name__}: {str(error)[:120]})"
    if not isinstance(frames, np.ndarray) or frames.ndim != 4 or frames.shape[-1] != 3 or not np.isfinite(frames).all():
        return None, f"does not hold a video (an array of shape {getattr(frames, 'shape', '?')})"
    return frames, None


def _matches(frames: np.ndarray, record: dict[str, Any]) -> bool:
    """Whether `frames` are the video `record` was measured on, as far as the record tells (its frame motion)."""
    recorded = record.get("motion")
    return recorded is None or math.isclose(frame_motion(frames), recorded, rel_tol=1e-3, abs_tol=1e-9)


def _save_video(path: Path, frames: np.ndarray) -> None:
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.npy")
    try:
        np.save(tmp, frames)
        os.replace(tmp, path)
    except OSError as error:
        raise refuse(path, f"cannot be written ({error.strerror or error})", "make the videos folder writable "
                     "(delete what is in the way) or pass another --out folder") from None


def _drop_unfinished_line(path: Path) -> None:
    """A crash mid-write leaves a last line without its newline: cut it, so the next record starts clean."""
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        logger.warning("dropping an unfinished record at the end of %s", path)
        with path.open("r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)


def _append(sink, record: dict[str, Any]) -> None:
    if isinstance(sink, contextlib.nullcontext):  # a process that does not write (context parallelism, rank > 0)
        return
    sink.write(json.dumps(finite(record), allow_nan=False) + "\n")
    sink.flush()
    os.fsync(sink.fileno())


def _verify(frames: np.ndarray, prompt: str) -> dict[str, Any]:
    from ..embedded.domain import parse_caption
    from ..embedded.verifier import verify

    report = verify(torch.from_numpy(frames.astype(np.float32)).permute(0, 3, 1, 2))
    try:
        agree = report.agrees_with(prompt)
        speed_class = parse_caption(prompt)["speed"]
    except ValueError:  # a prompt outside the domain: what was seen, without agreement
        agree, speed_class = {}, None
    vx, vy = report.velocity
    return {**{k: bool(v) for k, v in agree.items()}, "consistency": report.consistency,
            "speed_px": float((vx**2 + vy**2) ** 0.5), "speed_class": speed_class}


# Fields of a record that reports compute with: each None or a number.
# Records written before object_psnr existed lack it (and object_identical): read as None (and False).
_NUMBERS = ("seconds", "speedup", "flops", "flops_fraction", "psnr", "object_psnr", "ssim", "lpips", "computed_steps",
            "steps", "cache_bytes", "peak_memory_bytes", "motion")
_VERIFIER = ("colour", "shape", "direction", "speed", "consistency", "speed_class")


def _record_of(line: bytes) -> dict[str, Any] | None:
    """The record a line holds, or None for a line that is not one (cut short by a crash, damaged, foreign)."""
    try:
        record = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if (not isinstance(record, dict) or not isinstance(record.get("video"), str)
            or not isinstance(record.get("method"), str) or not isinstance(record.get("family"), (str, type(None)))
            or record.get("status") not in ("ok", "skipped", "failed")):
        return None
    if any(not (record.get(k) is None or _is_number(record[k])) for k in _NUMBERS):
        return None
    if record["status"] == "ok" and not (_is_number(record.get("seconds")) and record["seconds"] >= 0):
        return None
    if not isinstance(record.get("object_identical", False), bool):
        return None
    verifier = record.get("verifier")
    if verifier is not None and (not isinstance(verifier, dict) or ("colour" in verifier
                                                                     and not all(k in verifier for k in _VERIFIER))):
        return None
    return record


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def load_records(out: Path) -> list[dict[str, Any]]:
    """Every finished record of every rank in `out`, the last one of each (video, method) where a failed
    measurement was retried. A line that holds no record (cut short by a crash, or damaged) is ignored with a
    warning, so what it held is measured again."""
    records: dict[tuple[str, str], dict[str, Any]] = {}
    for path in sorted(Path(out).glob("records.rank*.jsonl")):
        try:
            lines = path.read_bytes().splitlines()
        except OSError as error:
            raise refuse(path, f"cannot be read ({error.strerror or error})",
                         "delete it (what it held is measured again) or pass another --out folder") from None
        for number, line in enumerate(lines, start=1):
            record = _record_of(line)
            if record is None:
                if line.strip():
                    logger.warning("ignoring line %d of %s: not a whole bench record (cut short or damaged); what it "
                                   "held is measured again", number, path)
                continue
            records.pop((record["video"], record["method"]), None)  # a retry goes where it was written
            records[(record["video"], record["method"])] = record
    return list(records.values())


def run_bench(pipe: Any, settings: BenchSettings, out: str | os.PathLike, *, tuned: Any = None,
              progress: bool = True, command: str | None = None) -> dict[str, Any] | None:
    """Run (or resume) a bench into `out` and write its report. Under torchrun (WORLD_SIZE > 1) each process takes
    every WORLD_SIZE-th video, or, with `settings.context_parallel` (diffusers' context parallelism enabled on the
    pipeline's transformers, after AdaCache), every process runs every video together and rank 0 writes the
    records; rank 0 waits for all, merges the records and writes the report (the others return None)."""
    rank, world = _distributed()
    bench = Bench(pipe, settings, out, tuned=tuned, rank=rank, world=world, progress=progress)
    # Each phase ends with every rank saying whether it failed, so one rank's error stops all (no rank is left
    # waiting at a barrier for a peer that is gone).
    report = None
    try:
        with _together(world):
            if rank == 0:
                bench.check_settings()
        with _together(world):
            if rank != 0:
                bench.check_settings()
            bench.run()
        with _together(world):
            if rank == 0:
                report = write_report(settings, load_records(bench.out), bench.out, command)
    finally:
        import torch.distributed as dist

        if world > 1 and dist.is_initialized():  # leave the group cleanly: gloo's threads alive at exit abort
            dist.destroy_process_group()
    return report


def _distributed() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment, joining the process group (gloo) on first use."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        import datetime

        # gloo works on CPU and GPU for the few barriers needed; shards may finish hours apart
        dist.init_process_group(backend="gloo", timeout=datetime.timedelta(hours=48))
    return dist.get_rank(), dist.get_world_size()


class _together:
    """Run a block on every rank, then agree: if any rank raised, every rank raises (the one that failed with its
    own error, the others with a RuntimeError naming how many failed)."""

    def __init__(self, world: int) -> None:
        self.world = world

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, error, trace) -> bool:
        if self.world > 1:
            import torch.distributed as dist

            from ..parallel import is_wait_timeout

            if error is not None and is_wait_timeout(error):  # a peer is frozen: agreeing would wait as long again
                return False
            failed = torch.tensor([1 if error is not None else 0])
            dist.all_reduce(failed)
            if error is None and int(failed):
                raise RuntimeError(f"{int(failed)} of {self.world} bench processes failed; see their errors above")
        return False
