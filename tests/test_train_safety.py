"""Hostile cases on the training path: a stop saves only a complete step and resumes bit for bit, the log never
holds a step twice, checkpoints are read without running code, and export never destroys a folder it did not
write. Each test here failed on the code before these fixes (see the commit message); they use only the public
API that code already had (`train`, `export`, `TrainConfig`), so each fails for its own reason."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from adacache.embedded import train as train_module
from adacache.embedded.pipeline import EmbeddedVideoPipeline
from adacache.embedded.train import TrainConfig, export, train
from adacache.interrupts import Terminated

STEPS = 6
STATE_KEYS = ("config", "step", "optimizer", "transformer", "text_encoder", "ema_transformer", "ema_text_encoder",
              "streams")


def tiny(**overrides) -> TrainConfig:
    return TrainConfig(**{"size": "tiny", "steps": STEPS, "batch_size": 2, "eval_every": 0, "checkpoint_every": 2,
                          "threads": 1, **overrides})


def same(a, b) -> bool:
    """Bit-for-bit equality of nested checkpoint contents."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(same, a, b))
    return a == b


def load(run):
    return torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=True)


def logged(run) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def snapshot(folder) -> dict:
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else "dir") for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 6-step run: what every stopped and resumed run must equal, bit for bit."""
    run = tmp_path_factory.mktemp("reference")
    train(run, tiny(), progress=False)
    return run


def assert_matches_reference(run, reference) -> None:
    ours, theirs = load(run), load(reference)
    for key in STATE_KEYS:
        assert key in ours and same(ours[key], theirs[key]), f"{key} differs from the uninterrupted run"
    strip = lambda records: [{k: v for k, v in r.items() if k != "seconds"} for r in records]  # noqa: E731
    assert strip(logged(run)) == strip(logged(reference))  # each step once, with the same loss
    assert not list(run.glob("*.tmp"))


def stop_inside_the_optimizer_step(monkeypatch, at_call: int, stop) -> None:
    """Make the `at_call`-th AdamW step apply its update, then call `stop()` before returning."""
    real_step = torch.optim.AdamW.step
    calls = []

    def step(self, *args, **kwargs):
        result = real_step(self, *args, **kwargs)
        calls.append(None)
        if len(calls) == at_call:
            stop()
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", step)


# --- 3. a stop saves a complete step only, and the resumed run is the uninterrupted one -----------------------------


@pytest.mark.parametrize("exception", [KeyboardInterrupt, Terminated])
def test_stop_raised_inside_the_optimizer_step_saves_no_half_step(exception, reference, tmp_path, monkeypatch):
    """Defect 3: the stop used to save step 3 with weights and Adam state after update 4; resuming applied it twice."""
    def stop():
        raise exception()

    stop_inside_the_optimizer_step(monkeypatch, at_call=4, stop=stop)
    with pytest.raises(KeyboardInterrupt) as raised:  # not pytest.raises(Terminated): a plain one would end pytest
        train(tmp_path, tiny(), progress=False)
    assert type(raised.value) is exception
    assert load(tmp_path)["step"] == 2  # the last checkpoint made at a step boundary; update 4 was never saved
    assert [r["step"] for r in logged(tmp_path)] == [1, 2, 3]
    monkeypatch.undo()
    train(tmp_path, tiny(), progress=False)
    assert_matches_reference(tmp_path, reference)


@pytest.fixture
def sigint_raises():
    """SIGINT raising KeyboardInterrupt, as in a process started from a terminal, whatever pytest inherited: a
    background job of a non-interactive shell (`pytest &` in a script, CI wrappers) starts with SIGINT ignored,
    Python then installs no KeyboardInterrupt handler, and a SIGINT is rightly dropped (train() restores SIG_IGN
    and re-raises into it). The previous handler is restored afterwards."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.mark.parametrize("signum, exception", [(signal.SIGINT, KeyboardInterrupt), (signal.SIGTERM, Terminated)])
def test_signal_during_the_optimizer_step_is_held_to_the_step_boundary(signum, exception, reference, tmp_path,
                                                                       monkeypatch, sigint_raises):
    """Defect 3: Ctrl-C or SIGTERM arriving during the update lets the step finish, saves it, then propagates (as
    `Terminated` for SIGTERM, for the CLI's exit code 143)."""
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    stop_inside_the_optimizer_step(monkeypatch, at_call=3, stop=lambda: signal.raise_signal(signum))
    with pytest.raises(KeyboardInterrupt) as raised:
        train(tmp_path, tiny(), progress=False)
    assert type(raised.value) is exception
    assert load(tmp_path)["step"] == 3
    assert [r["step"] for r in logged(tmp_path)] == [1, 2, 3]
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers  # restored
    monkeypatch.undo()
    train(tmp_path, tiny(), progress=False)
    assert_matches_reference(tmp_path, reference)


def test_an_ignored_sigint_during_the_optimizer_step_stays_ignored(reference, tmp_path, monkeypatch):
    """Guard: a process that ignores SIGINT (a background job of a script) is not stopped by one held in the
    update; training runs on, and SIG_IGN is restored."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        stop_inside_the_optimizer_step(monkeypatch, at_call=3, stop=lambda: signal.raise_signal(signal.SIGINT))
        train(tmp_path, tiny(), progress=False)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)
    assert_matches_reference(tmp_path, reference)


def test_stop_during_the_forward_pass_saves_the_stream_positions_of_the_boundary(reference, tmp_path, monkeypatch):
    """The data and noise streams are part of the state: a stop after step 4 drew its batch and noise saves the
    positions at the start of step 4, so the resumed run draws what the uninterrupted one drew. (They used to be
    reseeded from the step on resume: reproducible, but not the run that never stopped.)"""
    real_loss = train_module.rectified_flow_loss
    calls = []

    def loss(*args):
        value = real_loss(*args)
        calls.append(None)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return value

    monkeypatch.setattr(train_module, "rectified_flow_loss", loss)
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path, tiny(), progress=False)
    assert load(tmp_path)["step"] == 3
    monkeypatch.undo()
    train(tmp_path, tiny(), progress=False)
    assert_matches_reference(tmp_path, reference)


_TRAIN_UNTIL_STOPPED = """
import sys
from adacache.embedded.train import TrainConfig, train
from adacache.interrupts import Terminated
config = TrainConfig(size="tiny", steps=100000, batch_size=2, eval_every=0, checkpoint_every=100000, threads=1)
try:
    train(sys.argv[1], config, progress=False)
except Terminated:
    sys.exit(143)
except KeyboardInterrupt:
    sys.exit(130)
"""


def test_sigterm_to_a_training_process_saves_a_step_that_resumes_exactly(tmp_path):
    """Defect 3 for real: a SIGTERM to a training process raises `Terminated`, saves the step it reached (no
    periodic save in between) with a matching log, and the resumed run equals an uninterrupted one."""
    run = tmp_path / "run"
    process = subprocess.Popen([sys.executable, "-c", _TRAIN_UNTIL_STOPPED, str(run)], stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while not ((run / "log.jsonl").is_file() and len((run / "log.jsonl").read_text().splitlines()) >= 2):
            assert process.poll() is None and time.monotonic() < deadline, "training never logged two steps"
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 143, stderr.decode()[-2000:]
    stopped_at = load(run)["step"]
    assert stopped_at >= 2 and [r["step"] for r in logged(run)] == list(range(1, stopped_at + 1))
    config = dict(checkpoint_every=100000, steps=stopped_at + 2)
    train(run, tiny(**config), progress=False)
    train(tmp_path / "uninterrupted", tiny(**config), progress=False)
    assert_matches_reference(run, tmp_path / "uninterrupted")


# --- 4. the log holds each step once ---------------------------------------------------------------------------


def test_log_never_holds_a_step_twice_after_a_lost_save(reference, tmp_path):
    """Defect 4: step 3 logged, its save lost (a kill between the two), and a line cut by the kill: the resumed
    run logged step 3 again after the torn line. Now the log is cut back to the checkpoint first."""
    train(tmp_path, tiny(steps=2), progress=False)
    saved = (tmp_path / "checkpoint.pt").read_bytes()
    train(tmp_path, tiny(steps=3), progress=False)
    (tmp_path / "checkpoint.pt").write_bytes(saved)  # as if killed after step 3's log line, before its save
    with (tmp_path / "log.jsonl").open("a") as log:
        log.write('{"step": 4, "lo')  # a line cut short
    train(tmp_path, tiny(), progress=False)
    assert (tmp_path / "log.jsonl").read_text().count("\n") == STEPS
    assert [r["step"] for r in logged(tmp_path)] == list(range(1, STEPS + 1))
    assert_matches_reference(tmp_path, reference)


def test_log_of_a_run_that_never_saved_is_not_appended_to(reference, tmp_path):
    """Defect 4: no checkpoint (killed before the first save) but a log of steps 1-3: a fresh run used to append
    1-6 to it."""
    (tmp_path / "log.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3)))
    train(tmp_path, tiny(), progress=False)
    assert [r["step"] for r in logged(tmp_path)] == list(range(1, STEPS + 1))
    assert_matches_reference(tmp_path, reference)


def test_a_log_jsonl_that_is_not_a_training_log_is_refused(tmp_path):
    (tmp_path / "log.jsonl").write_text("my own notes\nnot json\n")
    with pytest.raises(ValueError, match="line 1 is not a record of `adacache train`.*another --out"):
        train(tmp_path, tiny(), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.jsonl"]
    assert (tmp_path / "log.jsonl").read_text() == "my own notes\nnot json\n"


# --- 2. checkpoints are read with weights_only=True, and a bad one is a clear error -----------------------------------


class RunsCode:
    """Unpickling this calls open(marker, "w"): what a crafted checkpoint does, harmlessly."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def crafted_checkpoint(path, marker) -> None:
    torch.save({"config": RunsCode(marker), "step": 1}, path)


def test_crafted_checkpoint_runs_no_code_when_exported(tmp_path):
    """Defect 2: `torch.load(weights_only=False)` built any object the pickle named."""
    marker, checkpoint = tmp_path / "code-ran", tmp_path / "checkpoint.pt"
    crafted_checkpoint(checkpoint, marker)
    with pytest.raises(ValueError, match=f"{checkpoint} is not a training checkpoint.*io.open.*expected"):
        export(checkpoint, tmp_path / "export")
    assert not marker.exists() and not (tmp_path / "export").exists()


def test_crafted_checkpoint_runs_no_code_when_resumed(tmp_path):
    marker, run = tmp_path / "code-ran", tmp_path / "run"
    run.mkdir()
    crafted_checkpoint(run / "checkpoint.pt", marker)
    with pytest.raises(ValueError, match=f"{run / 'checkpoint.pt'} is not a training checkpoint"):
        train(run, tiny(), progress=False)
    assert not marker.exists() and sorted(p.name for p in run.iterdir()) == ["checkpoint.pt"]


@pytest.mark.parametrize(
    "content, message",
    [
        (b"not a checkpoint at all", "is not a training checkpoint"),
        ({"step": 3}, "lacks config, optimizer, transformer"),
        ([1, 2, 3], "holds a list, not a dict"),
        ("unknown config key", "holds a config `adacache train` cannot use"),
        ("bad config value", "holds a config `adacache train` cannot use.*batch_size must be >= 1"),
        ("wrong shape", "does not fit the WanTransformer3DModel"),
        ("folder", "is a folder"),
        ("missing", "does not exist"),
    ],
)
def test_what_is_not_a_checkpoint_is_a_clear_error_naming_the_file(content, message, reference, tmp_path):
    """Defect 2: these gave KeyError, UnpicklingError, RuntimeError or TypeError tracebacks."""
    checkpoint = tmp_path / "checkpoint.pt"
    if isinstance(content, bytes):
        checkpoint.write_bytes(content)
    elif content == "folder":
        checkpoint.mkdir()
    elif isinstance(content, str) and content != "missing":
        state = load(reference)
        if content == "unknown config key":
            state["config"]["colour_depth"] = 8
        elif content == "bad config value":
            state["config"]["batch_size"] = 0
        else:
            name = next(iter(state["ema_transformer"]))
            state["ema_transformer"][name] = torch.zeros(3)
        torch.save(state, checkpoint)
    elif content != "missing":
        torch.save(content, checkpoint)
    with pytest.raises(ValueError, match=f"{checkpoint} .*{message}.*expected a checkpoint.pt written by"):
        export(checkpoint, tmp_path / "export")
    assert not (tmp_path / "export").exists()


def test_resume_from_a_checkpoint_whose_weights_do_not_fit_is_a_clear_error(reference, tmp_path):
    state = load(reference)
    name = next(iter(state["transformer"]))
    state["transformer"][name] = torch.zeros(3)
    torch.save(state, tmp_path / "checkpoint.pt")
    before = snapshot(tmp_path)
    with pytest.raises(ValueError, match="checkpoint.pt does not fit the WanTransformer3DModel"):
        train(tmp_path, tiny(), progress=False)
    assert snapshot(tmp_path) == before


def test_a_checkpoint_with_non_finite_weights_stops_at_the_first_loss(reference, tmp_path):
    """A damaged checkpoint (NaN weights) used to train on silently, every later step NaN too; now the first
    non-finite loss stops training before its update, and the checkpoint stays as it was."""
    state = load(reference)
    state["config"]["steps"] = 5
    state["step"] = 5
    name = next(iter(state["transformer"]))
    state["transformer"][name] = torch.full_like(state["transformer"][name], math.nan)
    torch.save(state, tmp_path / "checkpoint.pt")
    before = snapshot(tmp_path)
    with pytest.raises(FloatingPointError, match="loss of step 6 is nan.*checkpoint.pt"):
        train(tmp_path, tiny(), progress=False)
    assert (tmp_path / "checkpoint.pt").read_bytes() == before["checkpoint.pt"]
    assert not logged(tmp_path)


def test_the_shipped_checkpoint_loads_with_weights_only():
    """Guard (not a regression test): the committed checkpoint holds only what weights_only=True allows."""
    from pathlib import Path

    from adacache.embedded.train import load_checkpoint

    state, config = load_checkpoint(Path(__file__).parents[1] / "checkpoints" / "embedded" / "checkpoint.pt")
    assert state["step"] == 2513 and config.size == "small" and config.architecture == "wan" and config.frame_channel


# --- 1. export never destroys what it did not write, and swaps an earlier export whole ---------------------------


@pytest.mark.parametrize("contents", ["someone's folder", "the run folder", "export plus notes",
                                      "export plus a file in a component"])
def test_export_refuses_a_folder_it_did_not_write(contents, reference, tmp_path):
    """Defect 1: export ran shutil.rmtree on whatever the folder held, the run's own checkpoint included."""
    folder = tmp_path / "dest"
    if contents == "someone's folder":
        folder.mkdir()
        (folder / "thesis.tex").write_text("years of work")
    elif contents == "the run folder":
        shutil.copytree(reference, folder)
    else:
        export(reference / "checkpoint.pt", folder)
        extra = folder / ("notes.txt" if contents == "export plus notes" else "transformer/notes.txt")
        extra.write_text("mine")
    before = snapshot(folder)
    with pytest.raises(ValueError, match="move .* away|pass a new or empty folder"):
        export(reference / "checkpoint.pt", folder)
    assert snapshot(folder) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dest"]  # no temporary folder left


def test_export_onto_a_file_is_refused(reference, tmp_path):
    target = tmp_path / "weights"
    target.write_text("a file")
    with pytest.raises(ValueError, match="export folder .*weights is a file"):
        export(reference / "checkpoint.pt", target)
    assert target.read_text() == "a file" and sorted(p.name for p in tmp_path.iterdir()) == ["weights"]


def test_reexport_replaces_an_earlier_export_whole_and_keeps_cache_configs(reference, tmp_path):
    """Defect 1: a re-export replaces an earlier export's files but keeps the cache configs that `adacache calibrate`
    wrote next to them (the README re-exports onto the shipped weights, which hold two); files of the earlier export
    that the new one does not write are gone; a stale `DIR.tmp` from an old crash does not leak in and is left alone;
    the folder gets ordinary permissions."""
    folder = tmp_path / "weights"
    export(reference / "checkpoint.pt", folder)
    (folder / "adacache.json").write_text('{"calibrated": 30}')
    (folder / "adacache-100.json").write_text('{"calibrated": 100}')
    (folder / "transformer" / "diffusion_pytorch_model-00002-of-00002.safetensors").write_bytes(b"old shard")
    stale = tmp_path / "weights.tmp"
    (stale / "transformer").mkdir(parents=True)
    (stale / "transformer" / "stale.bin").write_bytes(b"stale")
    (stale / "junk.txt").write_text("stale")
    state = load(reference)
    state["step"] = 99
    state["ema_transformer"] = {k: v + 1 for k, v in state["ema_transformer"].items()}
    torch.save(state, tmp_path / "later.pt")

    assert export(tmp_path / "later.pt", folder) == folder
    assert json.loads((folder / "training.json").read_text())["step"] == 99
    assert (folder / "adacache.json").read_text() == '{"calibrated": 30}'
    assert (folder / "adacache-100.json").read_text() == '{"calibrated": 100}'
    names = set(snapshot(folder))
    assert "transformer/diffusion_pytorch_model-00002-of-00002.safetensors" not in names
    assert not {"junk.txt", "transformer/stale.bin"} & names
    pipe = EmbeddedVideoPipeline.from_pretrained(folder, local_files_only=True)
    assert all(torch.equal(pipe.transformer.state_dict()[k], v) for k, v in state["ema_transformer"].items())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["later.pt", "weights", "weights.tmp"]
    assert (stale / "junk.txt").read_text() == "stale"
    umask = os.umask(0)
    os.umask(umask)
    assert folder.stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's 0700


def test_reexport_never_leaves_the_folder_half_written_or_the_earlier_export_lost(reference, tmp_path, monkeypatch):
    """Defect 1: seen at every rename of the swap, the folder holds the earlier export or the complete new one;
    in the one moment it holds neither (between the two renames) the earlier export is whole in the backup. The
    old code deleted the earlier export before its new one was in place."""
    folder = tmp_path / "weights"
    export(reference / "checkpoint.pt", folder)
    earlier = snapshot(folder)
    seen = []
    real_replace = os.replace

    def observe():
        backups = [snapshot(b / "weights") for b in tmp_path.glob(".weights.previous-*") if (b / "weights").is_dir()]
        seen.append((snapshot(folder) if folder.exists() else None, backups))

    def replace(source, destination):
        observe()
        real_replace(source, destination)
        observe()

    monkeypatch.setattr(os, "replace", replace)
    state = load(reference)
    state["step"] = 99
    torch.save(state, tmp_path / "later.pt")
    export(tmp_path / "later.pt", folder)
    monkeypatch.undo()
    final = snapshot(folder)
    assert final != earlier and seen
    for in_folder, backups in seen:
        assert in_folder in (earlier, final) or (in_folder is None and earlier in backups)


def test_export_into_an_empty_or_a_new_folder(reference, tmp_path):
    """Guard: the plain cases still work (a new folder's parents are made)."""
    (tmp_path / "empty").mkdir()
    for folder in (tmp_path / "empty", tmp_path / "new" / "deeper"):
        export(reference / "checkpoint.pt", folder)
        assert json.loads((folder / "training.json").read_text())["step"] == STEPS
        assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "EmbeddedVideoPipeline"


@pytest.mark.parametrize("failure", ["while writing", "while swapping"])
def test_failed_export_leaves_the_earlier_export_as_it_was(failure, reference, tmp_path, monkeypatch):
    """Defect 1: an export stopped while writing left `DIR.tmp` behind; one that failed after the rmtree lost the
    earlier export. Now the earlier export is untouched, or renamed back, and no temporary folder is left."""
    folder = tmp_path / "weights"
    export(reference / "checkpoint.pt", folder)
    (folder / "adacache.json").write_text("{}")
    before = snapshot(folder)
    if failure == "while writing":
        real_save = EmbeddedVideoPipeline.save_pretrained

        def save_pretrained(self, directory, **kwargs):
            real_save(self, directory, **kwargs)
            raise KeyboardInterrupt

        monkeypatch.setattr(EmbeddedVideoPipeline, "save_pretrained", save_pretrained)
        expected = KeyboardInterrupt
    else:
        real_replace = os.replace

        def replace(source, destination):
            if os.fspath(destination) == os.fspath(folder) and "previous" not in os.fspath(source):
                raise OSError("disk gone")
            return real_replace(source, destination)

        monkeypatch.setattr(os, "replace", replace)
        expected = OSError
    with pytest.raises(expected):
        export(reference / "checkpoint.pt", folder)
    monkeypatch.undo()
    assert snapshot(folder) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["weights"]


# --- 5. other hostile input: clear ValueErrors that say what to change ------------------------------------------


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("batch_size", 0, r"batch_size must be >= 1, got 0 \(--batch-size\)"),
        ("batch_size", -4, r"batch_size must be >= 1"),
        ("batch_size", 2.5, r"batch_size must be an integer, got 2.5"),
        ("steps", 0, r"steps must be >= 1, got 0 \(--steps\)"),
        ("steps", "10", r"steps must be an integer, got '10'"),
        ("checkpoint_every", 0, r"checkpoint_every must be >= 1"),
        ("seed", -1, r"seed must be >= 0, got -1 \(--seed\)"),
        ("lr", 0.0, r"lr must be > 0"),
        ("lr", math.nan, r"lr must be a finite number"),
        ("ema", 1.0, r"ema must be in \[0, 1\)"),
        ("cfg_dropout", 1.5, r"cfg_dropout must be in \[0, 1\]"),
        ("warmup", -1, r"warmup must be >= 0"),
        ("eval_every", -1, r"eval_every must be >= 0"),
        ("threads", 0, r"threads must be from 1 to 256, got 0 \(--threads\)"),
        ("threads", 100_000, r"threads must be from 1 to 256, got 100000 \(--threads\)"),
        ("size", "huge", r"size must be one of tiny, small, deep, got 'huge' \(--size\)"),
        ("architecture", "dit", r"architecture must be one of wan, latte"),
        ("steps", True, r"steps must be an integer, got True"),
    ],
)
def test_bad_training_config_is_refused_before_anything_runs(field, value, message):
    """batch_size 0 used to fail only at the first batch, after the run folder and log were made; checkpoint_every
    0 with a ZeroDivisionError after the first step; seed -1 in numpy; size 'huge' at model building; the rest
    trained or saved nonsense."""
    with pytest.raises(ValueError, match=message):
        tiny(**{field: value})


def test_zero_warmup_trains(tmp_path):
    """warmup=0 (no warm-up) divided by zero in the learning-rate schedule."""
    train(tmp_path, tiny(steps=1, warmup=0), progress=False)
    assert logged(tmp_path)[0]["lr"] == pytest.approx(tiny().lr)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"steps": 4}, "already at step 6, past --steps 4; pass --steps 6 or more"),
        ({"seed": 1}, "trained from seed 0, not 1; pass --seed 0 to resume it, or another --out"),
        ({"architecture": "latte"}, "holds a tiny wan model, not tiny latte; pass matching"),
        ({"size": "small"}, "holds a tiny wan model, not small wan; pass matching"),
    ],
)
def test_resume_that_does_not_fit_the_checkpoint_is_refused_untouched(overrides, message, reference, tmp_path):
    """--steps below the checkpoint's step used to re-save it silently with the smaller total; another seed was a
    mere warning (its weights and data came from the first seed). The architecture check was already there."""
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    before = snapshot(run)
    with pytest.raises(ValueError, match=message):
        train(run, tiny(**overrides), progress=False)
    assert snapshot(run) == before


def test_resume_at_the_final_step_changes_nothing(reference, tmp_path):
    """Guard: running the same command again after it finished is a no-op."""
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    before = snapshot(run)
    assert train(run, tiny(), progress=False) == run / "checkpoint.pt"
    assert snapshot(run) == before


@pytest.mark.parametrize("blocker", ["out is a file", "checkpoint.pt is a folder", "log.jsonl is a folder"])
def test_run_folder_that_cannot_hold_a_run_is_refused_up_front(blocker, tmp_path):
    """An --out that is a file gave FileExistsError; a checkpoint.pt folder trained 200 steps before failing to
    save; a log.jsonl folder gave IsADirectoryError."""
    out = tmp_path / "run"
    if blocker == "out is a file":
        out.write_text("a file")
    else:
        (out / blocker.split()[0]).mkdir(parents=True)
    before = snapshot(tmp_path)
    with pytest.raises(ValueError, match="is a file; pass a folder|is not a file; move it away or pass another --out"):
        train(out, tiny(), progress=False)
    assert snapshot(tmp_path) == before
