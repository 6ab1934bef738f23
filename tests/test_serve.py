"""`adacache serve`, the web page: the function its button calls (videos, plot, numbers, messages for bad input),
the plot on hand-made statistics, the command's start-up errors, and the page itself in a headless Chromium
(skipped, with the reason, where no browser or driver is installed)."""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from adacache import AdaCacheConfig
from adacache.cli import main
from adacache.hooks import GenerationStats
from adacache.pipelines import load_pipeline
from adacache.serve import DEFAULT_PROMPT, KEEP_RUNS, WebPage, _runs, distance_plot, load_codebooks


@pytest.fixture(scope="module")
def embedded():
    pipe = load_pipeline(None, progress=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def page(embedded, tmp_path):
    return WebPage(embedded, tmp_path / "serve")


def _frame_count(path) -> int:
    import imageio_ffmpeg

    return imageio_ffmpeg.count_frames_and_secs(str(path))[0]


# --- the button's function ------------------------------------------------------------------------------------------


def test_generate_returns_both_videos_the_plot_and_the_numbers(page):
    pytest.importorskip("gradio")
    from matplotlib.figure import Figure

    uncached, cached, figure, numbers = page.generate(DEFAULT_PROMPT, "auto", False, 6, 0, 4.0)
    uncached, cached = Path(uncached), Path(cached)
    assert uncached != cached and {uncached.suffix, cached.suffix} == {".mp4"}
    for video in (uncached, cached):
        assert video.is_file() and page.folder in video.parents
        assert _frame_count(video) == 8  # the embedded model's 8 frames
    assert isinstance(figure, Figure)
    # 6 steps: the shipped codebook may compute all of them, giving the uncached video exactly
    assert re.search(r"\| \*\*\d+\.\d\dx\*\* \| (\d+\.\d dB|identical \(∞ dB\)) \| cond_uncond \d/6 \|", numbers), \
        numbers
    assert "the embedded model's adacache.json" in numbers
    distance_line = figure.axes[0].lines[0]
    assert distance_line.get_label() == "probe distance at a computed step"
    assert list(distance_line.get_xdata())[0] == 2  # step 1 has no previous probe, so no distance


def test_the_calibration_free_settings_are_on_the_page(page):
    pytest.importorskip("gradio")
    assert {"quality", "balanced", "fast"} <= set(page.cache_choices)
    _, _, figure, numbers = page.generate(DEFAULT_PROMPT, "fast", True, 12, 0, 4.0)
    assert "Cache: fast + MoReg" in numbers
    assert figure.axes[0].get_ylabel() == "probe distance, relative to the first"  # no codebook: no thresholds
    assert not [line for line in figure.axes[0].lines if line.get_label() == "codebook threshold"]


def test_generate_with_a_codebook_file_and_moreg(embedded, tmp_path):
    pytest.importorskip("gradio")
    path = tmp_path / "fast.json"
    AdaCacheConfig(codebook={0.5: 3, 10.0: 2}).save(path)
    page = WebPage(embedded, tmp_path / "serve", codebooks=load_codebooks([str(path)]))
    assert page.cache_choices[-1] == str(path)
    _, _, figure, numbers = page.generate("a blue square moving down slow", str(path), True, 8, 3, 2.0)
    assert f"Cache: {path} + MoReg" in numbers
    # the codebook's thresholds within the plot's range are dashed lines
    assert any(line.get_label() == "codebook threshold" for line in figure.axes[0].lines)


@pytest.mark.parametrize("prompt, cache, steps, seed, guidance, message", [
    ("", "auto", 6, 0, 4.0, "the prompt is empty"),
    ("   ", "auto", 6, 0, 4.0, "the prompt is empty"),
    (None, "auto", 6, 0, 4.0, "the prompt is empty"),
    ("hello world", "auto", 6, 0, 4.0, "has no word the embedded model knows"),
    ("red " * 40, "auto", 6, 0, 4.0, "has 40 words"),
    (DEFAULT_PROMPT, "nope", 6, 0, 4.0, "unknown cache 'nope'; pick one of: auto, balanced, fast, opensora-100-fast"),
    (DEFAULT_PROMPT, "auto", 3, 0, 4.0, "steps must be a whole number from 4 to 100, got 3"),
    (DEFAULT_PROMPT, "auto", 101, 0, 4.0, "steps must be a whole number from 4 to 100"),
    (DEFAULT_PROMPT, "auto", 6.5, 0, 4.0, "steps must be a whole number"),
    (DEFAULT_PROMPT, "auto", True, 0, 4.0, "steps must be a whole number"),
    (DEFAULT_PROMPT, "auto", 6, -1, 4.0, "seed must be a whole number from 0 to 18446744073709551615"),
    (DEFAULT_PROMPT, "auto", 6, 2**64, 4.0, "seed must be a whole number"),
    (DEFAULT_PROMPT, "auto", 6, None, 4.0, "seed must be a whole number"),
    (DEFAULT_PROMPT, "auto", 6, 0, float("nan"), "guidance must be a number from 0 to 100"),
    (DEFAULT_PROMPT, "auto", 6, 0, -1, "guidance must be a number"),
    (DEFAULT_PROMPT, "auto", 6, 0, 1e30, "guidance must be a number"),
])
def test_bad_inputs_are_one_message_on_the_page(page, prompt, cache, steps, seed, guidance, message):
    gr = pytest.importorskip("gradio")
    with pytest.raises(gr.Error) as raised:
        page.generate(prompt, cache, False, steps, seed, guidance)
    assert message in raised.value.message and "Traceback" not in raised.value.message
    assert not page.folder.exists()  # refused before any work: nothing written


def test_unknown_words_are_a_warning(page):
    pytest.importorskip("gradio")
    with pytest.warns(UserWarning, match="does not know the words 'dancing'"):
        page.generate("a red circle dancing", "opensora-30-fast", False, 4, 0, 4.0)


def test_failures_during_generation_are_one_line_and_free_the_model(page, monkeypatch):
    gr = pytest.importorskip("gradio")
    import adacache.serve

    def fail(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(adacache.serve, "compare", fail)
    with pytest.raises(gr.Error) as raised:
        page.generate(DEFAULT_PROMPT, "auto", False, 6, 0, 4.0)
    assert raised.value.message == "the generation failed: RuntimeError: boom"
    assert not page._lock.locked()


def test_a_diverging_generation_says_so(tmp_path):
    gr = pytest.importorskip("gradio")
    from adacache.embedded.train import build_pipeline

    pipe = build_pipeline("tiny", architecture="wan")
    with torch.no_grad():
        pipe.transformer.proj_out.weight.fill_(float("nan"))
    pipe.set_progress_bar_config(disable=True)
    with pytest.raises(gr.Error) as raised:
        WebPage(pipe, tmp_path / "serve").generate(DEFAULT_PROMPT, "auto", False, 4, 0, 4.0)
    assert "non-finite" in raised.value.message


def test_generations_take_turns(page, monkeypatch):
    """Two requests at once (the queue allows one; the lock is the second guard): one runs after the other."""
    pytest.importorskip("gradio")
    import adacache.serve

    active, most, real = [0], [0], adacache.serve.compare

    def counted(*args, **kwargs):
        active[0] += 1
        most[0] = max(most[0], active[0])
        try:
            time.sleep(0.2)
            return real(*args, **kwargs)
        finally:
            active[0] -= 1

    monkeypatch.setattr(adacache.serve, "compare", counted)
    results, errors = [], []

    def request(seed):
        try:
            results.append(page.generate(DEFAULT_PROMPT, "auto", False, 4, seed, 4.0))
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=request, args=(seed,)) for seed in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert errors == [] and len(results) == 2 and most[0] == 1
    assert len({r[0] for r in results}) == 2  # each run its own folder


def test_close_waits_for_the_generation_in_progress_and_refuses_new_ones(page, monkeypatch):
    """`serve` closes the page on Ctrl-C. The server's worker threads are daemons: one still inside torch when the
    interpreter exits is killed there and the process aborts (exit -6, not 130); so close() waits for it."""
    gr = pytest.importorskip("gradio")
    import adacache.serve

    started, release, real = threading.Event(), threading.Event(), adacache.serve.compare

    def held(*args, **kwargs):
        started.set()
        release.wait(60)
        return real(*args, **kwargs)

    monkeypatch.setattr(adacache.serve, "compare", held)
    results = []
    worker = threading.Thread(target=lambda: results.append(page.generate(DEFAULT_PROMPT, "auto", False, 4, 0, 4.0)))
    worker.start()
    assert started.wait(60) and page.busy
    closer = threading.Thread(target=page.close)
    closer.start()
    closer.join(0.5)
    assert closer.is_alive()  # waiting for the generation
    release.set()
    closer.join(60)
    worker.join(60)
    assert not closer.is_alive() and len(results) == 1 and not page.busy
    with pytest.raises(gr.Error, match="the server is stopping"):
        page.generate(DEFAULT_PROMPT, "auto", False, 4, 0, 4.0)


def test_generate_on_a_diffusers_pipeline(tmp_path):
    """A --model pipeline (a tiny WanPipeline: CFG as two calls, so two branches in the plot and the numbers)."""
    pytest.importorskip("gradio")
    from tiny_pipelines import save_tiny_pipeline

    folder = save_tiny_pipeline("wan", tmp_path / "wan")
    pipe = load_pipeline(str(folder), progress=False)
    pipe.set_progress_bar_config(disable=True)
    page = WebPage(pipe, tmp_path / "serve", model=str(folder), call={"height": 32, "width": 32, "num_frames": 9})
    uncached, cached, figure, numbers = page.generate("a cat surfing", "auto", False, 5, 0, 5.0)
    assert _frame_count(uncached) == _frame_count(cached) == 9
    assert "Cache: auto: balanced, the calibration-free default" in numbers
    assert re.search(r"cond \d/5, uncond \d/5", numbers), numbers
    assert [label.get_text() for label in figure.axes[1].get_yticklabels()] == ["cond", "uncond"]


def test_old_runs_are_deleted(page):
    folders = [page.next_folder() for _ in range(KEEP_RUNS + 2)]
    assert sorted(page.folder.iterdir()) == folders[2:]


def test_page_has_its_controls_and_one_generation_at_a_time(page):
    pytest.importorskip("gradio")
    blocks = page.build()
    ids = {c.get("props", {}).get("elem_id") for c in blocks.get_config_file()["components"]}
    assert {"prompt", "cache", "moreg", "steps", "seed", "guidance", "generate", "uncached-video", "cached-video",
            "summary", "distance-plot"} <= ids
    (event,) = blocks.fns.values()
    assert (event.concurrency_limit, event.queue) == (1, True)


# --- what a raw API client can send, and a client that leaves ------------------------------------------------------
RAW_GOOD = [DEFAULT_PROMPT, "auto", False, 6, 0, 4.0]  # prompt, cache, moreg, steps, seed, guidance


def _raw(index, value):
    values = list(RAW_GOOD)
    values[index] = value
    return values


RAW_BAD = [  # (values sent to the generate API, the message expected)
    (_raw(4, float("nan")), "seed must be a whole number from 0 to 18446744073709551615, got nan"),
    (_raw(4, float("inf")), "seed must be a whole number"),
    (_raw(4, "7"), "seed must be a whole number from 0 to 18446744073709551615, got '7'"),
    (_raw(3, None), "steps must be a whole number from 4 to 100, got None"),
    (_raw(3, "6"), "steps must be a whole number from 4 to 100, got '6'"),
    (_raw(5, "4.0"), "guidance must be a number from 0 to 100 (at most 1 turns guidance off), got '4.0'"),
    (_raw(5, {"a": 1}), "guidance must be a number from 0 to 100"),
    (_raw(5, None), "guidance must be a number from 0 to 100"),
    (_raw(2, "yes"), "moreg must be true or false, got 'yes'"),
    (_raw(2, None), "moreg must be true or false, got None"),
    (_raw(1, 3), "unknown cache 3; pick one of: auto"),
    (_raw(1, ["auto"]), "unknown cache ['auto']; pick one of: auto"),
    (_raw(0, 12), "the prompt must be text, got 12"),
    (_raw(0, ["a red circle"]), "the prompt must be text, got ['a red circle']"),
    (_raw(0, "x" * 500), "the prompt"),
    (RAW_GOOD[:3], "the generate API takes 6 values (prompt, cache, moreg, steps, seed, guidance), got 3"),
    (RAW_GOOD + [1], "the generate API takes 6 values (prompt, cache, moreg, steps, seed, guidance), got 7"),
]


@pytest.mark.parametrize("values, message", [case for case in RAW_BAD if len(case[0]) == 6])
def test_every_raw_value_the_api_may_send_is_one_message(page, values, message):
    gr = pytest.importorskip("gradio")
    with pytest.raises(gr.Error) as raised:
        page.generate(*values)
    assert message in raised.value.message and len(raised.value.message) < 400
    assert not page.folder.exists()


@pytest.fixture(scope="module")
def server(embedded, tmp_path_factory):
    """The page served in this process on a free loopback port: (WebPage, API base URL)."""
    pytest.importorskip("gradio")
    from adacache.serve import launch

    folder = tmp_path_factory.mktemp("serve")
    page = WebPage(embedded, folder)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    app = launch(page.build(), "127.0.0.1", port, folder)
    yield page, f"http://127.0.0.1:{port}/gradio_api"
    app.close(verbose=False)
    page.close()


def _post(base, values) -> str:
    """Send `values` to the generate API; its event id."""
    import json

    body = json.dumps({"data": values}).encode()  # NaN and Infinity as Python's json writes them
    request = urllib.request.Request(f"{base}/call/generate", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())["event_id"]


def _outcome(base, event) -> tuple[str, object]:
    """The event's last server-sent event: ("complete", outputs) or ("error", message)."""
    import json

    with urllib.request.urlopen(f"{base}/call/generate/{event}", timeout=120) as response:
        text = response.read().decode()
    kind = re.findall(r"^event: (\w+)$", text, re.M)[-1]
    data = json.loads(re.findall(r"^data: (.*)$", text, re.M)[-1])
    return kind, (data.get("error") if isinstance(data, dict) else data)


@pytest.mark.parametrize("values, message", RAW_BAD)
def test_the_generate_api_answers_every_bad_raw_value_with_its_message(server, values, message):
    page, base = server
    kind, said = _outcome(base, _post(base, values))
    assert kind == "error" and isinstance(said, str) and message in said, said
    assert not page.busy and not list(page.folder.glob("run-*"))


def test_uploads_are_refused(server):
    """The page takes no file: gradio's upload route refuses one with a byte in it (HTTP 413), saving nothing."""
    _, base = server
    boundary = "adacache-test"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"a.bin\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + b"x" * 2048 + f"\r\n--{boundary}--\r\n".encode()
    request = urllib.request.Request(f"{base}/upload", body, {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=30)
    assert refused.value.code == 413 and b"maximum allowed size of 0 bytes" in refused.value.read()


def test_a_client_that_disconnects_stops_its_generation_and_frees_the_model(server, embedded):
    """A 100-step comparison (up to 200 transformer calls, each slowed to 50 ms here) whose client closes its
    connection after the second call: the generation stops at a transformer call within a few seconds, the model
    is free, nothing more runs, and the next generation works."""
    import http.client

    page, base = server
    calls = []

    def slow(module, args):
        calls.append(time.monotonic())
        time.sleep(0.05)

    handle = embedded.transformer.register_forward_pre_hook(slow)
    try:
        event = _post(base, [DEFAULT_PROMPT, "auto", False, 100, 0, 4.0])
        host, port = base.split("//")[1].split("/")[0].split(":")
        connection = http.client.HTTPConnection(host, int(port), timeout=60)
        connection.request("GET", f"/gradio_api/call/generate/{event}")
        connection.getresponse()
        deadline = time.monotonic() + 120
        while len(calls) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(calls) >= 2, "the generation did not start"
        connection.sock.close()  # the client leaves
        connection.close()
        left = time.monotonic()
        while (page.busy or len(calls) < 2) and time.monotonic() < deadline:
            time.sleep(0.05)
        stopped = time.monotonic() - left
        made = len(calls)
        time.sleep(1.0)
        assert not page.busy and len(calls) == made and made < 100, (made, stopped)
        assert stopped < 20, stopped
    finally:
        handle.remove()
    uncached, cached, _, _ = page.generate(DEFAULT_PROMPT, "auto", False, 4, 0, 4.0)  # the model works on
    assert Path(uncached).is_file() and Path(cached).is_file()


# --- the plot, on hand-made statistics ------------------------------------------------------------------------------


def test_runs_of_steps():
    assert _runs([8, 3, 4, 5]) == [(3, 5), (8, 8)]
    assert _runs([]) == []


def test_distance_plot_marks_every_step():
    stats = GenerationStats(
        branch="cond_uncond", generation=1, num_steps=10, steps_seen=10, computed_steps=[1, 2, 3, 6, 9, 10],
        skipped_steps=[4, 5, 7, 8], distances=[None, 0.4, 0.1, 0.05, 0.2, 0.3], rates=[1, 1, 3, 3, 1, 1],
        motion=[None] * 6, cache_bytes=0, notes=[])
    figure = distance_plot([stats], 10, {0.08: 3, 0.25: 2, 5.0: 1})
    axes, timeline, rates = figure.axes
    (line, *thresholds) = axes.lines
    assert list(line.get_xdata()) == [2, 3, 6, 9, 10]
    assert list(line.get_ydata()) == [0.4, 0.1, 0.05, 0.2, 0.3]
    assert [t.get_ydata()[0] for t in thresholds] == [0.08, 0.25]  # 5.0 is far above the curve (top 0.5)
    assert [tick.get_text() for tick in rates.get_yticklabels()] == ["< 0.08: rate 3", "< 0.25: rate 2"]
    shaded = [(p.get_x(), p.get_width()) for p in axes.patches]  # skipped steps, as runs
    assert shaded == [(3.5, 2.0), (6.5, 2.0)]
    computed, skipped = timeline.collections
    assert len(computed.get_paths()) == 6 and len(skipped.get_paths()) == 4
    assert [a.get_text() for a in axes.texts] == ["1", "3", "3", "1", "1"]  # the rate chosen at steps 2, 3, 6, 9, 10


def test_distance_plot_without_statistics_says_so():
    figure = distance_plot([], 6)
    assert "no AdaCache statistics" in figure.axes[0].texts[0].get_text()


# --- the command ----------------------------------------------------------------------------------------------------


def _no_model(monkeypatch):
    import adacache.pipelines

    def refuse(*args, **kwargs):
        raise AssertionError("the model must not load after a start-up error")

    monkeypatch.setattr(adacache.pipelines, "load_pipeline", refuse)


def test_serve_without_gradio_is_one_error(monkeypatch, capsys, tmp_path):
    _no_model(monkeypatch)
    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio raises ImportError
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.delenv("GRADIO_TEMP_DIR", raising=False)
    assert main(["serve", "--no-browser"]) == 2
    assert capsys.readouterr().err == ('adacache: error: the command line needs gradio, which the light install (pip '
                                       'install adacache) leaves out: pip install "adacache[all]"\n')
    assert list(tmp_path.iterdir()) == []  # its temporary folder is gone
    assert "GRADIO_TEMP_DIR" not in os.environ


@pytest.mark.parametrize("argv, message", [
    (["--codebook", "missing.json"], "--codebook: the config file 'missing.json' does not exist"),
    (["--codebook", "opensora-30-fast"], "the presets and auto are on the page already"),
    (["--height", "64"], "--height: the embedded model makes 16x16 clips"),
])
def test_serve_start_up_errors(argv, message, monkeypatch, capsys, tmp_path):
    pytest.importorskip("gradio")
    _no_model(monkeypatch)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    assert main(["serve", "--no-browser", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("adacache: error: ") and message in err and err.count("\n") == 1, err
    assert list(tmp_path.iterdir()) == []


def test_serve_refuses_a_port_in_use_before_loading(monkeypatch, capsys, tmp_path):
    pytest.importorskip("gradio")
    _no_model(monkeypatch)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--no-browser", "--port", str(port)]) == 2
    assert capsys.readouterr().err == (f"adacache: error: cannot serve on 127.0.0.1:{port}: the port is in use; "
                                       "pick another --port (or --host)\n")
    assert list(tmp_path.iterdir()) == []


def test_serve_rejects_a_bad_port(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["serve", "--port", "70000"])
    assert stop.value.code == 2 and "must be an integer from 1 to 65535" in capsys.readouterr().err


def test_import_adacache_does_not_import_gradio():
    code = "import sys, adacache, adacache.cli; adacache.cli.build_parser(); print('gradio' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


# --- the page in a real headless browser ----------------------------------------------------------------------------


def _browser() -> tuple[str, str]:
    """(chromium, chromedriver) paths, or skip with the reason."""
    for module in ("selenium", "gradio"):
        try:
            __import__(module)
        except ImportError:
            pytest.skip(f"{module} is not installed (pip install -e '.[test]')")
    browser = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
    driver = shutil.which("chromedriver")
    if browser is None or driver is None:
        missing = " and ".join(name for name, path in (("chromium", browser), ("chromedriver", driver)) if not path)
        pytest.skip(f"no headless browser: {missing} not found (apt-get install chromium chromium-driver)")
    return browser, driver


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait(condition, seconds: float, what: str, server: subprocess.Popen):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"the server exited ({server.returncode}) while waiting for {what}:\n{server.stdout.read()}")
        value = condition()
        if value:
            return value
        time.sleep(0.5)
    pytest.fail(f"no {what} within {seconds:.0f} s")


def test_page_in_a_headless_browser(tmp_path):
    """`adacache serve` in a subprocess (loopback only), driven by headless Chromium: the page loads, a generation
    runs, both videos play and the plot and numbers appear; a bad prompt is a message; Ctrl-C leaves no file."""
    browser, driver = _browser()
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    temp, cwd = tmp_path / "tmp", tmp_path / "cwd"
    temp.mkdir()
    cwd.mkdir()
    port = _free_port()
    env = {**os.environ, "TMPDIR": str(temp)}
    # SIGINT at its default, as under a terminal's Ctrl-C: a child inherits an ignored SIGINT (pytest run as a
    # background job of a script), Python then installs no KeyboardInterrupt handler, and the server would rightly
    # ignore the SIGINT below until killed (as in test_cli_errors)
    server = subprocess.Popen([sys.executable, "-m", "adacache.cli", "serve", "--port", str(port), "--no-browser"],
                              cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    url = f"http://127.0.0.1:{port}/"

    def up() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return response.status == 200
        except OSError:
            return False

    options = webdriver.ChromeOptions()
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1250",
                     "--autoplay-policy=no-user-gesture-required", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(argument)
    options.binary_location = browser
    home = {"XDG_CONFIG_HOME": str(tmp_path / "config"), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    page = None
    try:
        _wait(up, 180, "page (server start-up)", server)
        page = webdriver.Chrome(options=options,
                                service=webdriver.ChromeService(executable_path=driver, env={**os.environ, **home}))
        page.get(url)
        _wait(lambda: page.find_elements(By.ID, "generate"), 60, "generate button", server)
        assert "AdaCache" in page.title
        prompt = page.find_element(By.CSS_SELECTOR, "#prompt textarea")
        prompt.clear()
        prompt.send_keys("a green triangle moving left fast")
        steps = page.find_element(By.CSS_SELECTOR, "#steps input[type=number]")
        steps.send_keys(Keys.CONTROL, "a")
        steps.send_keys("10", Keys.TAB)  # few, but enough for the shipped codebook to skip some
        _wait(lambda: page.find_element(By.CSS_SELECTOR, "#steps input[type=range]").get_attribute("value") == "10",
              10, "steps set to 10", server)
        page.find_element(By.ID, "generate").click()

        def shown():
            videos = page.find_elements(By.CSS_SELECTOR, "#uncached-video video, #cached-video video")
            plots = page.find_elements(By.CSS_SELECTOR, "#distance-plot img")
            return len(videos) == 2 and all(v.get_attribute("src") for v in videos) and plots and videos

        videos = _wait(shown, 150, "videos and plot after Generate", server)
        assert [v.get_attribute("src").rsplit("/", 1)[-1] for v in videos] == ["uncached.mp4", "adacache.mp4"]
        decoded = "return arguments[0].readyState >= 1 && arguments[0].videoWidth"
        _wait(lambda: all(page.execute_script(decoded, v) for v in videos), 30, "videos decoded", server)
        assert [page.execute_script("return arguments[0].videoWidth", v) for v in videos] == [256, 256]
        numbers = page.find_element(By.ID, "summary").text
        assert re.search(r"\d+\.\d\dx", numbers) and re.search(r"\d+\.\d dB|identical", numbers), numbers
        assert re.search(r"cond_uncond \d+/10", numbers), numbers
        plot = page.find_element(By.CSS_SELECTOR, "#distance-plot img")
        assert page.execute_script("return arguments[0].naturalWidth", plot) > 500
        time.sleep(1)  # the videos' first frames drawn
        page.save_screenshot(str(tmp_path / "serve.png"))
        if os.environ.get("ADACACHE_SCREENSHOT"):
            page.save_screenshot(os.environ["ADACACHE_SCREENSHOT"])

        prompt.clear()
        prompt.send_keys("hello world")
        page.find_element(By.ID, "generate").click()
        _wait(lambda: "has no word the embedded model knows" in page.find_element(By.TAG_NAME, "body").text, 30,
              "error message for a prompt the model cannot read", server)
        assert "Traceback" not in page.find_element(By.TAG_NAME, "body").text
    finally:
        if page is not None:
            page.quit()
        server.send_signal(signal.SIGINT)
        killed = False
        try:
            output = server.communicate(timeout=60)[0]
        except subprocess.TimeoutExpired:
            server.kill()
            output = server.communicate()[0]
            killed = True
    assert not killed, f"the server did not stop within 60 s of SIGINT and was killed:\n{output}"
    assert server.returncode == 130, output
    assert "Traceback" not in output, output
    assert list(temp.iterdir()) == [] and list(cwd.iterdir()) == []  # nothing left outside its temporary folder
