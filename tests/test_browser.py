"""The app in a real headless Chromium: links open, the address bar follows, tabs draw.

Starts ``streamlit run app.py`` on a free port once for the module and drives it
with Playwright's sync API through Debian's Chromium (``/usr/bin/chromium``;
Playwright's own browser downloads are not used). Screenshots land in
``tests/artifacts/`` (git-ignored).

Run: ``python -m pytest tests/test_browser.py -m browser``.
"""

from __future__ import annotations

import contextlib
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from bnexplore.tools import bench
from tests.team_server import SETTLED_JS, free_port, healthy, stop

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
CHROMIUM = Path(bench.CHROMIUM)
CHROMIUM_ARGS = bench.CHROMIUM_ARGS
VIEWPORT = {"width": 1500, "height": 1000}

SERVER_START_S = 120
FIRST_RUN_MS = 120_000  # the first script run imports PyTorch and TensorFlow
RERUN_MS = 60_000

APP = "[data-testid='stApp']"
CHART = "[data-testid='stVegaLiteChart']"
HEADLINE = "[data-testid='stMain'] h3"
METRIC_VALUE = "[data-testid='stMain'] [data-testid='stMetricValue']"
TABLE = "[data-testid='stMain'] [data-testid='stMarkdownContainer'] table"
EXCEPTION = "[data-testid='stException']"
WARNING = "[data-testid='stAlertContentWarning']"
ERROR = "[data-testid='stAlertContentError']"
ACTIVE_PANEL = "[role='tabpanel']:visible"

LINK = (
    "/?v=1&shape=16,8,6,6&input=normal&mean=0.5&steps=2&torch_mode=eval"
    "&keras_momentum=0.9&keras_eps=1e-05"
)
# PyTorch trains, Keras 3 infers, eps and momenta differ: "Make them agree" has work to do
DIFFERING_LINK = "/?v=1&shape=16,8,6,6&input=normal&mean=0.5&steps=2"
BAD_LINK = "/?v=1&steps=abc&shape=1000,1000,1000&foo=bar&torch_eps=-1"
PRESET_LINK = "/?preset=one-sample"

TABS = {  # tab name: fewest charts it draws, screenshot
    "Overview": (1, "tab_overview.png"),
    "Outputs": (1, "tab_outputs.png"),
    "Running statistics": (2, "tab_running.png"),
    "Explain": (1, "tab_explain.png"),
    "Code": (0, "tab_code.png"),
}

# The script run is over and the page drawn: no stale or lazily loading element is
# left, and either an exception box or both the headline and the sidebar are there.


# The visible tab panel's charts: how many, and whether each is drawn (a canvas with
# painted pixels, or an svg with marks); -1 while something in it is still loading.
PANEL_CHARTS_JS = """() => {
    const panel = Array.from(document.querySelectorAll("[role='tabpanel']"))
        .find(p => p.offsetParent !== null);
    if (!panel || panel.querySelector("[data-testid='stSkeleton']")) return [-1, false];
    const charts = Array.from(panel.querySelectorAll("[data-testid='stVegaLiteChart']"));
    const drawn = charts.every(chart => {
        const canvas = chart.querySelector('canvas');
        if (canvas) {
            if (!canvas.width || !canvas.height) return false;
            const data = canvas.getContext('2d')
                .getImageData(0, 0, canvas.width, canvas.height).data;
            for (let i = 3; i < data.length; i += 4) if (data[i] !== 0) return true;
            return false;
        }
        const svg = chart.querySelector('svg');
        return svg !== null && svg.querySelector('path, rect, line') !== null;
    });
    return [charts.length, drawn];
}"""


# --- fixtures ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chromium():
    """A headless Debian Chromium, driven by Playwright."""
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing (Debian: apt-get install -y chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory) -> Path:
    """The server's store of uploaded files: a folder of this module's own."""
    return tmp_path_factory.mktemp("store")


@pytest.fixture(scope="module")
def app_url(chromium, store_dir) -> Iterator[str]:
    """``streamlit run app.py`` on a free port; yields its base URL.

    Requests ``chromium`` first so that a missing browser skips before the
    server starts.
    """
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "streamlit", "run", "app.py"]
    for option, value in (
        ("server.headless", "true"),
        ("server.port", str(port)),
        ("browser.gatherUsageStats", "false"),
        ("server.fileWatcherType", "none"),
    ):
        command += [f"--{option}", value]
    with tempfile.TemporaryFile(mode="w+") as log:
        proc = subprocess.Popen(
            command,
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own process group, killed as one
            env={**os.environ, "BNEXPLORE_STORE": str(store_dir)},
        )
        try:
            deadline = time.monotonic() + SERVER_START_S
            while not healthy(url):
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    why = (
                        f"exited with {proc.returncode}"
                        if proc.poll() is not None
                        else f"gave no health answer in {SERVER_START_S} s"
                    )
                    pytest.fail(f"streamlit server {why}:\n{log.read()[-3000:]}")
                time.sleep(0.5)
            yield url
        finally:
            stop(proc)


@pytest.fixture
def new_page(chromium):
    """Pages, each in its own fresh context (so its own Streamlit session)."""
    contexts = []

    def make():
        context = chromium.new_context(viewport=VIEWPORT)
        context.set_default_timeout(30_000)
        contexts.append(context)
        return context.new_page()

    yield make
    for context in contexts:
        context.close()


# --- helpers -------------------------------------------------------------------------


def _failure_shot(page, name: str = "failure.png") -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(Exception):  # the original failure matters, not this one
        page.screenshot(path=str(ARTIFACTS / name))


def wait_for_app(page, timeout_ms: int = RERUN_MS) -> None:
    """The script run is over and drawn; an exception box fails with its text."""
    try:
        page.wait_for_function(SETTLED_JS, timeout=timeout_ms)
    except Exception:
        _failure_shot(page)
        raise
    assert_no_exception(page)


def open_app(page, url: str, timeout_ms: int = FIRST_RUN_MS) -> None:
    page.goto(url, wait_until="domcontentloaded", timeout=timeout_ms)
    wait_for_app(page, timeout_ms)


def assert_no_exception(page) -> None:
    errors = page.locator(EXCEPTION)
    if errors.count():
        _failure_shot(page)
    assert errors.count() == 0, "the app raised:\n" + "\n---\n".join(errors.all_inner_texts())


def screenshot(page, name: str) -> Path:
    """Everything: Streamlit scrolls the main area and the sidebar inside the viewport,
    so the viewport is grown to their full height for the shot, then set back."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    height = page.evaluate(
        """() => Math.max(
            ...['stMain', 'stSidebarContent'].map(id => {
                const el = document.querySelector(`[data-testid='${id}']`);
                return el ? el.scrollHeight : 0;
            }),
            window.innerHeight)"""
    )
    page.set_viewport_size({"width": VIEWPORT["width"], "height": min(int(height) + 40, 8000)})
    page.wait_for_timeout(600)  # charts re-layout to the new size
    path = ARTIFACTS / name
    page.screenshot(path=str(path), full_page=True)
    page.set_viewport_size(VIEWPORT)
    return path


def widget(page, key: str):
    """The sidebar widget of parameter ``key`` (Streamlit key ``w_<key>``)."""
    return page.locator(f"[data-testid='stSidebar'] .st-key-w_{key}")


def widget_input(page, key: str):
    return widget(page, key).locator("input").first


def radio(page, key: str, option: str):
    return widget(page, key).get_by_role("radio", name=option, exact=True)


def assert_link_values(page, steps: int) -> None:
    """The sidebar shows every value ``LINK`` (with ``steps`` training steps) asks for."""
    from playwright.sync_api import expect

    expect(widget_input(page, "shape")).to_have_value("16,8,6,6")
    # "Values" has four kinds: a select box, which shows the chosen one
    expect(widget(page, "input").get_by_role("combobox")).to_have_value("normal")
    expect(widget_input(page, "mean")).to_have_value("0.5")
    expect(widget_input(page, "steps")).to_have_value(str(steps))
    expect(radio(page, "torch_mode", "eval")).to_be_checked()
    expect(radio(page, "torch_mode", "train")).not_to_be_checked()
    # number inputs format floats their own way (1e-05 shows as 0.00001): compare numbers
    momentum = widget_input(page, "keras_momentum").input_value()
    assert math.isclose(float(momentum), 0.9), momentum
    eps = widget_input(page, "keras_eps").input_value()
    assert math.isclose(float(eps), 1e-5, rel_tol=1e-9), eps
    # the parameters the link leaves out keep their defaults
    expect(widget_input(page, "torch_momentum")).to_have_value("0.1")


def shown_numbers(page) -> dict[str, object]:
    """The headline, the metric values and the Overview table, as the user reads them."""
    page.wait_for_selector(METRIC_VALUE)
    return {
        "headline": page.locator(HEADLINE).first.inner_text().strip(),
        "metrics": [t.strip() for t in page.locator(METRIC_VALUE).all_inner_texts()],
        "table": page.locator(TABLE).first.inner_text().strip(),
    }


def show_tab(page, name: str, fewest_charts: int = 0) -> int:
    """Select a tab; wait until its panel's charts are all drawn; return how many.

    Done when at least ``fewest_charts`` charts are drawn and their number held
    still for two polls (a lazily loaded chart may appear after the others).
    """
    from playwright.sync_api import expect

    tab = page.get_by_role("tab", name=name, exact=True)
    tab.click()
    expect(tab).to_have_attribute("aria-selected", "true")
    deadline = time.monotonic() + RERUN_MS / 1000
    last = None
    while time.monotonic() < deadline:
        count, drawn = page.evaluate(PANEL_CHARTS_JS)
        if drawn and count >= fewest_charts and count == last:
            return count
        last = count if drawn else None
        page.wait_for_timeout(400)
    _failure_shot(page)
    raise AssertionError(
        f"tab {name!r}: wanted at least {fewest_charts} drawn charts; "
        f"the panel holds {count}, drawn: {drawn}"
    )


def query(url: str) -> dict[str, list[str]]:
    return parse_qs(urlsplit(url).query)


# --- tests ---------------------------------------------------------------------------


def test_link_opens_with_every_widget_showing_its_value(app_url, new_page):
    page = new_page()
    open_app(page, app_url + LINK)

    assert_link_values(page, steps=2)
    numbers = shown_numbers(page)
    assert numbers["headline"].startswith("max |Δ| = "), numbers
    assert len(numbers["metrics"]) == 5, numbers
    assert "PyTorch" in numbers["table"] and "Keras 3" in numbers["table"], numbers


def test_address_bar_follows_widgets_and_reproduces_the_page(app_url, new_page):
    page = new_page()
    open_app(page, app_url + LINK)

    steps = widget_input(page, "steps")
    steps.fill("4")
    steps.press("Enter")
    page.wait_for_url(lambda url: "steps=4" in url, timeout=RERUN_MS)
    wait_for_app(page)

    link = page.url
    assert query(link)["steps"] == ["4"], link
    assert query(link)["torch_mode"] == ["eval"], link
    assert_link_values(page, steps=4)
    numbers = shown_numbers(page)
    assert numbers["headline"].startswith("max |Δ| = "), numbers

    again = new_page()  # a new browser context: nothing shared but the link
    open_app(again, link)
    assert again.url == link
    assert_link_values(again, steps=4)
    assert shown_numbers(again) == numbers


def test_the_open_tab_is_in_the_link_and_a_shared_link_opens_on_it(app_url, new_page):
    from playwright.sync_api import expect

    page = new_page()
    open_app(page, app_url + LINK)
    assert "tab" not in query(page.url)  # Overview, the default
    show_tab(page, "Explain", fewest_charts=1)
    page.wait_for_url(lambda url: "tab=explain" in url, timeout=RERUN_MS)
    wait_for_app(page)
    link = page.url
    assert query(link)["tab"] == ["explain"] and query(link)["steps"] == ["2"], link

    again = new_page()  # a teammate opens the shared address
    open_app(again, link)
    explain = again.get_by_role("tab", name="Explain", exact=True)
    expect(explain).to_have_attribute("aria-selected", "true")
    assert query(again.url)["tab"] == ["explain"]
    # the Explain panel itself is drawn: its waterfall chart
    again.wait_for_function(
        f"() => {{ const [n, drawn] = ({PANEL_CHARTS_JS})(); return n >= 1 && drawn; }}",
        timeout=RERUN_MS,
    )
    again.screenshot(path=str(ARTIFACTS / "shared_link_opens_on_explain.png"))


def test_every_tab_draws_its_charts(app_url, new_page):
    page = new_page()
    open_app(page, app_url + LINK)

    names = [t.strip() for t in page.get_by_role("tab").all_inner_texts()]
    assert set(TABS) <= set(names), names
    drawn = {}
    for name in names:  # tabs added since TABS was written are drawn and shot too
        fewest, shot = TABS.get(name, (0, f"tab_{name.lower().replace(' ', '_')}.png"))
        drawn[name] = show_tab(page, name, fewest)
        assert_no_exception(page)
        if name == "Overview":
            assert page.locator(f"{ACTIVE_PANEL} [data-testid='stMetricValue']").count() == 5
        if name == "Code":
            assert page.locator(f"{ACTIVE_PANEL} [data-testid='stCode']").count() >= 2
            assert page.get_by_role("button", name="Export script").count() == 1
        screenshot(page, shot)
    print("charts per tab:", drawn)


def test_make_them_agree(app_url, new_page):
    page = new_page()
    open_app(page, app_url + DIFFERING_LINK)
    before = page.locator(HEADLINE).first.inner_text()
    assert "normalized with" in before, before

    show_tab(page, "Code")
    page.get_by_role("button", name="Make them agree").click()
    page.wait_for_url(lambda url: "keras_training=true" in url, timeout=RERUN_MS)
    wait_for_app(page)

    assert query(page.url)["keras_training"] == ["true"], page.url
    headline = page.locator(HEADLINE).first.inner_text()
    assert "differ only by rounding" in headline or "agree" in headline, headline
    screenshot(page, "make_them_agree.png")


def test_bad_link_warns(app_url, new_page):
    page = new_page()
    open_app(page, app_url + BAD_LINK)

    warning = page.locator(WARNING)
    assert warning.count() == 1, warning.all_inner_texts()
    text = warning.inner_text()
    for key in ("steps", "shape", "foo", "torch_eps"):
        assert key in text, f"{key!r} not named in the warning:\n{text}"
    # what was refused is out of the address bar too
    assert not {"steps", "shape", "foo", "torch_eps"} & set(query(page.url)), page.url
    screenshot(page, "bad_link.png")


def test_preset_link_shows_pytorch_error(app_url, new_page):
    page = new_page()
    open_app(page, app_url + PRESET_LINK)

    error = page.locator(ERROR)
    assert error.count() >= 1, "no error box"
    text = "\n".join(error.all_inner_texts())
    assert "Expected more than 1 value per channel" in text, text
    # the preset is expanded into the link
    params = query(page.url)
    assert params.get("shape") == ["1,8"] and params.get("keras_training") == ["true"], page.url
    screenshot(page, "preset_one_sample.png")


def test_uploading_a_state_dict_links_its_digest_and_charts_its_layer(
    app_url, new_page, tmp_path, store_dir
):
    import hashlib

    import torch

    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 5, 3),
        torch.nn.BatchNorm2d(5),
        torch.nn.Conv2d(5, 7, 3),
        torch.nn.BatchNorm2d(7),
    )
    with torch.no_grad():
        model[1].running_var.copy_(torch.tensor([1e-6, 1e-5, 0.5, 1.0, 2.0]))
    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()

    page = new_page()
    open_app(page, app_url + "/?v=1&shape=4,3,3,3&input=normal")
    uploader = page.locator("[data-testid='stSidebar'] .st-key-upload_state input[type='file']")
    uploader.set_input_files(str(path))
    page.wait_for_url(lambda url: "state=" in url, timeout=RERUN_MS)
    wait_for_app(page)

    params = query(page.url)
    assert params["state"] == [digest] and params["init"] == ["state"], page.url
    assert params["layer"] == ["1"] and params["shape"] == ["4,5,3,3"], page.url
    assert params["torch_mode"] == ["eval"], page.url
    assert (store_dir / digest).is_file()
    table = page.locator("[data-testid='stSidebar'] table").first.inner_text()
    assert "1\t5" in table and "3\t7" in table, table
    assert page.locator(WARNING).count() == 0, page.locator(WARNING).all_inner_texts()
    assert show_tab(page, "Your layer", 1) == 1
    screenshot(page, "your_layer.png")


def test_a_refused_model_is_said_on_the_model_tab_as_written(app_url, new_page, tmp_path):
    """A whole pickled module is refused; the Model tab says so in its own area (not only
    in the sidebar), and the class's name reads as the file has it, not as Markdown."""
    import sys

    import torch

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = torch.nn.BatchNorm1d(3)

    Net.__module__, Net.__qualname__ = "__main__", "Net"
    main = sys.modules["__main__"]
    main.Net = Net  # where pickle looks it up
    try:
        torch.save(Net(), tmp_path / "whole.pt")
    finally:
        del main.Net

    page = new_page()
    open_app(page, app_url + "/?v=1&tab=model")
    uploader = page.locator("[data-testid='stSidebar'] .st-key-upload_state input[type='file']")
    uploader.set_input_files(str(tmp_path / "whole.pt"))
    page.wait_for_function(
        "() => document.querySelector(\"[data-testid='stMain'] "
        "[data-testid='stAlertContentError']\") !== null",
        timeout=RERUN_MS,
    )
    wait_for_app(page)
    said = page.locator(f"[data-testid='stMain'] {ERROR}").first.inner_text()
    assert said.startswith("This model was refused: whole.pt: refused: a full-model file"), said
    assert "__main__.Net" in said, said
    assert "state=" not in page.url
    screenshot(page, "model_refused.png")


# --- every engine in every legend; a layer of any size ---------------------------------

KERAS_BACKENDS_LINK = "/?preset=keras-backends&tab=outputs"
ALL_ENGINES_LINK = "/?v=1&engines=torch,keras,keras_jax,keras_torch,keras2,flax"

# The legend labels of each chart in the visible tab panel, as Vega drew them (SVG: the
# renderer Streamlit picks for charts this small), each only where it lies inside the
# chart's own box (a legend too wide for its chart is cut off at the chart's edge).
PANEL_LEGENDS_JS = """() => {
    const panel = Array.from(document.querySelectorAll("[role='tabpanel']"))
        .find(p => p.offsetParent !== null);
    return Array.from(panel.querySelectorAll("[data-testid='stVegaLiteChart']")).map(chart => {
        const box = chart.getBoundingClientRect();
        return Array.from(chart.querySelectorAll('.role-legend-label text'))
            .filter(t => {
                const r = t.getBoundingClientRect();
                return r.width > 0 && r.left >= box.left - 1 && r.right <= box.right + 1;
            })
            .map(t => t.textContent);
    });
}"""


def engines_shown(page, names: list[str]) -> list[str]:
    """The labels of ``names`` that ran: an engine whose framework is missing here is named
    in an error box instead, and has no line to draw."""
    from bnexplore.engines import LABELS

    missing = " ".join(page.locator(ERROR).all_inner_texts())
    return [LABELS[n] for n in names if f"{LABELS[n]} is missing" not in missing]


def assert_every_engine_in_every_legend(page, labels: list[str], fewest: int) -> None:
    """Each chart of the open tab whose legend names an engine names all of them; at
    least ``fewest`` charts do."""
    legends = page.evaluate(PANEL_LEGENDS_JS)
    of_engines = [legend for legend in legends if set(legend) & set(labels)]
    assert len(of_engines) >= fewest, legends
    for legend in of_engines:
        assert set(labels) <= set(legend), (labels, legend)


def test_every_keras_backend_is_in_the_outputs_legends(app_url, new_page):
    page = new_page()
    open_app(page, app_url + KERAS_BACKENDS_LINK)
    labels = engines_shown(page, ["keras", "keras_jax", "keras_torch"])
    assert len(labels) >= 2, labels
    assert show_tab(page, "Outputs", 3) >= 3
    assert_every_engine_in_every_legend(page, labels, fewest=3)
    screenshot(page, "legends_keras_backends_outputs.png")


def test_every_engine_of_the_all_engines_link_is_in_every_legend(app_url, new_page):
    page = new_page()
    open_app(page, app_url + ALL_ENGINES_LINK)
    labels = engines_shown(page, ["torch", "keras", "keras_jax", "keras_torch", "keras2", "flax"])
    assert len(labels) >= 2, labels
    # the Overview's chart is drawn on a canvas (its legend is pixels: tests/test_charts.py
    # reads it from the spec); Outputs: distribution and 2 per channel; Running statistics:
    # 2 over the passes and 2 per channel (|Δ| per pass is by statistic)
    assert show_tab(page, "Overview", 1) == 1
    screenshot(page, "legends_all_engines_overview.png")
    for tab, fewest in (("Outputs", 3), ("Running statistics", 4)):
        show_tab(page, tab, fewest)
        assert_no_exception(page)
        assert_every_engine_in_every_legend(page, labels, fewest)
        screenshot(page, f"legends_all_engines_{tab.lower().replace(' ', '_')}.png")


@pytest.mark.parametrize("channels", [5001, 100_000])
def test_a_layer_of_thousands_of_channels_draws_on_the_your_layer_tab(
    app_url, new_page, tmp_path, store_dir, monkeypatch, channels
):
    import numpy as np

    from bnexplore.files.store import store_file

    rng = np.random.default_rng(channels)
    variance = rng.lognormal(0.0, 1.0, channels)
    variance[::9] = 1e-6  # where eps decides
    path = tmp_path / f"bn_{channels}.npz"
    np.savez(
        path,
        **{
            "bn.running_mean": rng.normal(size=channels),
            "bn.running_var": variance,
            "bn.weight": np.ones(channels),
            "bn.bias": np.zeros(channels),
        },
    )
    monkeypatch.setenv("BNEXPLORE_STORE", str(store_dir))  # the test server's store
    digest = store_file(path)

    page = new_page()
    open_app(page, app_url + f"/?v=1&state={digest}&init=state&shape=2,8&input=normal&tab=layer")
    assert show_tab(page, "Your layer", 1) == 1
    assert_no_exception(page)
    panel = page.locator(ACTIVE_PANEL)
    chart = panel.locator(CHART).first.text_content()
    assert "Layer bn: running variance per channel" in chart, chart
    assert f"of {channels:,} channels" in chart and "runs of" in chart, chart
    assert f"{channels} channels" in panel.inner_text()  # the caption under the chart
    screenshot(page, f"your_layer_{channels}_channels.png")


# --- your whole model ---------------------------------------------------------------------


def test_the_model_tab_ranks_every_layer_and_a_chosen_row_opens_that_layer(
    app_url, new_page, tmp_path, store_dir, monkeypatch
):
    """A trained CNN and its broken port: the Model tab charts every layer's gaps, tables
    them worst first with the port's findings, and choosing a row opens that layer."""
    from playwright.sync_api import expect

    from bnexplore.files.store import store_file
    from tests import checkpoints as ck

    cnn = ck.small_cnn()
    broken = ck.swap_gamma_beta(ck.bn_layers(cnn), "bn2")
    ck.save_state_dict(cnn, tmp_path / "cnn.pt")
    ck.save_npz(broken, tmp_path / "port.npz")
    monkeypatch.setenv("BNEXPLORE_STORE", str(store_dir))  # the test server's store
    digest, port = store_file(tmp_path / "cnn.pt"), store_file(tmp_path / "port.npz")

    page = new_page()
    open_app(page, app_url + f"/?v=1&state={digest}&port={port}&engines=torch,keras&tab=model")
    assert show_tab(page, "Your model", 1) == 1
    panel = page.locator(ACTIVE_PANEL)
    assert "The gap of each layer" in panel.locator(CHART).first.text_content()
    tables = panel.locator("[data-testid='stDataFrame']")
    expect(tables).to_have_count(2)
    assert "4 BatchNorm layers" in panel.inner_text()
    screenshot(page, "model_tab.png")

    # the grid draws on a canvas: its first data row's selection box sits at its left edge,
    # one header row down
    tables.first.scroll_into_view_if_needed()
    page.wait_for_timeout(300)
    box = tables.first.bounding_box()
    page.mouse.click(box["x"] + 16, box["y"] + 35 + 17)
    try:
        page.wait_for_url(lambda url: "tab=outputs" in url, timeout=RERUN_MS)
    except Exception:
        _failure_shot(page, "model_tab_click.png")
        raise
    wait_for_app(page)
    params = query(page.url)
    assert params["state"] == [digest] and params["layer"] == [ck.TINY_LAYER], page.url
    assert params["init"] == ["state"] and params["input"] == ["running"], page.url
    assert params["torch_mode"] == ["eval"] and params["keras_training"] == ["false"]
