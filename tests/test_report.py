"""`certify report`: one self-contained HTML file of a results directory and its job record.
Results directories are hostile input: what they hold is shown as text, never run. The file
is opened in a real headless browser where one is installed (Chromium through Playwright)."""

from __future__ import annotations

import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from certlib.rows import CONFIG, shard_path
from cluster.cli import main
from cluster.record import failures_dir, progress_file, sweep_file
from tests.helpers import quickstart_like

PROGRESS = {
    "images_done": 720,
    "images_total": 720,
    "images_per_second": 300.0,
    "eta_seconds": 0,
    "units_done": 12,
    "units_total": 12,
    "units_failed": 1,
    "models_trained": 12,
    "models_to_train": 12,
    "training": {},
}
HOSTILE = '<script>window.pwned = 1</script><img src=x onerror="window.pwned = 2">'


def written_results(out: Path, training: str = "standard") -> Path:
    """Quickstart-shaped rows as a results directory (shards under benign paths; the rows' own
    ``training`` and ``device`` may be anything), with a job record: its sweep, progress and a
    failure."""
    rows = quickstart_like(training).assign(seconds=0.002, device=f"cpu {training}")
    for config, shard in rows.groupby(list(CONFIG)):
        path = shard_path(out, {**dict(zip(CONFIG, config)), "training": "standard"}, "report")
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pandas(shard, preserve_index=False), path)
    sweep_file(out).parent.mkdir(parents=True)
    sweep_file(out).write_text(json.dumps({"name": training, "radii": [0.0, 0.5, 1.0], "methods": ["dssn"]}))
    progress_file(out).write_text(json.dumps({"job_id": training, "state": "SUCCEEDED", **PROGRESS}))
    failures_dir(out).mkdir()
    (failures_dir(out) / "unit-1.json").write_text(json.dumps({"task": training, "attempts": 3, "error": training}))
    return out


def report_of(results: Path, tmp_path: Path) -> str:
    out = tmp_path / "report.html"
    result = CliRunner().invoke(main, ["report", str(results), "-o", str(out)])
    assert result.exit_code == 0, result.output
    return out.read_text()


def test_the_report_holds_the_tables_curves_models_failures_and_spec(tmp_path):
    page = report_of(written_results(tmp_path / "quickstart"), tmp_path)
    assert page.count("<table>") == 2 and page.count("<svg") == 1  # one norm: its envelope and its models
    assert "<th>r = 0.5</th>" in page and "dssn / standard" in page and "σ=0.25" in page
    assert "certified accuracy (%)" in page and "L1 radius (pixel scale [0, 1])" in page  # the SVG's text is text
    assert "<td>0.002</td>" in page  # seconds per image
    assert "name: standard" in page and "radii:" in page  # the spec, as YAML
    assert "(3 attempts)" in page and "job standard: SUCCEEDED; progress: 720/720 images" in page
    assert not re.search(r"(src|href)\s*=\s*[\"']?(https?:|//)", page)  # nothing fetched: self-contained


def test_a_hostile_results_directory_is_shown_as_text(tmp_path):
    page = report_of(written_results(tmp_path / "hostile", HOSTILE), tmp_path)
    assert "<script" not in page.lower() and "<img" not in page.lower()
    assert not re.search(r"<[^>]*\sonerror\s*=", page)  # an attribute would run; text between tags does not
    escaped = "&lt;script&gt;window.pwned = 1&lt;/script&gt;"
    # in the tables, the curves' legend, the devices, the failure, the spec
    assert page.count(escaped) >= 5
    assert "default-src 'none'" in page  # no script would run even if one slipped through


def test_the_report_refuses_a_path_inside_the_results_or_another_suffix(tmp_path):
    results = written_results(tmp_path / "quickstart")
    inside = CliRunner().invoke(main, ["report", str(results), "-o", str(results / "r.html")])
    assert inside.exit_code == 2 and "result shards only" in inside.output and not (results / "r.html").exists()
    pdf = CliRunner().invoke(main, ["report", str(results), "-o", str(tmp_path / "r.pdf")])
    assert pdf.exit_code == 2 and "must end in .html" in pdf.output


def _chromium() -> str | None:
    """A Chromium the tests can drive: the distribution's, or Playwright's own."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if found := shutil.which(name):
            return found
    return None


@pytest.fixture(scope="module")
def browser():
    """A headless Chromium, driven through Playwright; the test is skipped, saying what is
    missing, where either is not installed."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed (pip install playwright)")
    with sync_api.sync_playwright() as playwright:
        executable = _chromium()
        try:
            browser = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        except Exception as err:  # noqa: BLE001 - no browser: Playwright's own was never downloaded
            pytest.skip(f"no Chromium to drive (apt-get install chromium): {str(err).splitlines()[0]}")
        yield browser
        browser.close()


def _visible(page, selector: str) -> None:
    box = page.locator(selector).first.bounding_box()
    assert box is not None and box["width"] > 100 and box["height"] > 30, (selector, box)


def test_the_report_in_a_headless_browser(browser, tmp_path):
    """Loaded from the file, offline: no console error, no script run (the hostile names are on
    the page as text), and the table and the plot take room on screen and on paper."""
    from PIL import Image

    results = written_results(tmp_path / "hostile", HOSTILE)
    out = tmp_path / "report.html"
    assert CliRunner().invoke(main, ["report", str(results), "-o", str(out)]).exit_code == 0
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    messages: list[str] = []
    page.on("console", lambda message: messages.append(f"{message.type}: {message.text}"))
    page.on("pageerror", lambda error: messages.append(f"error: {error}"))
    requests: list[str] = []
    page.on("request", lambda request: requests.append(request.url))
    page.goto(out.as_uri())
    assert messages == [] and requests == [out.as_uri()]  # nothing fetched but the file
    assert page.evaluate("window.pwned === undefined && document.scripts.length === 0")
    assert page.get_by_text(HOSTILE).count() >= 3  # shown as text: the failure, the spec, the devices
    _visible(page, "table")
    _visible(page, "figure svg")
    assert page.locator("td", has_text=f"dssn / {HOSTILE}").count() == 1
    shot = np.asarray(Image.open(io.BytesIO(page.screenshot(full_page=True))).convert("L"))
    assert shot.std() > 10 and (shot < 100).mean() > 0.005  # not blank: text and curves drawn
    page.emulate_media(media="print")
    _visible(page, "table")
    _visible(page, "figure svg")
    assert page.pdf()[:4] == b"%PDF"
    page.close()
