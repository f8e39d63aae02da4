"""`report --format html`: one self-contained page, its numbers those of table.csv, checked in a real browser."""
import base64
import csv
import html
import json
import math
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest

from harness import html_report, report
from harness.cli import main
from harness.errors import HarnessError
from harness.metrics import summarise
from harness.plots import write_figures

QUICK = ["--protocol", "quickdraw20_2x10", "--epochs", "1", "--max-train-per-class", "8", "--quiet", "--device", "cpu",
         "--threads", "1"]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Two methods x two seeds, as `run` leaves them (table.csv and report.html included)."""
    out = tmp_path_factory.mktemp("html")
    assert main(["run", "--methods", "finetune", "icarl", "--seeds", "0", "1", *QUICK, "--out", str(out)]) == 0
    return out / "quickdraw20_2x10+maxtrain=8"


class _Page(HTMLParser):
    """Images, links, ids, scripts and the paper table's cells of a page."""

    def __init__(self):
        super().__init__()
        self.images, self.links, self.ids, self.scripts, self.external = [], [], set(), 0, []
        self.rows, self._in_table, self._cell = [], False, None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.add(a["id"])
        for key in ("src", "href"):
            if re.match(r"(https?:)?//", a.get(key) or ""):
                self.external.append(a[key])
        if tag == "img":
            self.images.append(a["src"])
        elif tag == "a" and a.get("href", "").startswith("#"):
            self.links.append(a["href"][1:])
        elif tag in ("script", "link", "iframe"):
            self.scripts += 1
        elif tag == "table" and a.get("id") == "paper-table":
            self._in_table = True
        elif self._in_table and tag == "tr":
            self.rows.append([])
        elif self._in_table and tag in ("td", "th"):
            self._cell = ""

    def handle_endtag(self, tag):
        if tag == "table":
            self._in_table = False
        elif self._in_table and tag in ("td", "th") and self._cell is not None:
            self.rows[-1].append(self._cell.strip())
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data


def _parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page


def _csv(path: Path) -> dict[str, dict[str, str]]:
    with path.open() as f:
        return {r.get("name") or r["label"]: r for r in csv.DictReader(f)}


def _pm(mean: str, std: str) -> str:
    """A table.csv mean and std as the paper table writes them ("–": not measured or undefined)."""
    if not mean:
        return "–"
    m, s = float(mean), float(std) if std else math.nan
    return f"{m:.1f}" if math.isnan(s) else f"{m:.1f} ± {s:.1f}"


COLUMNS = {"Avg (%)": "avg_incremental_accuracy", "Last (%)": "last_accuracy",
           "Forgetting (%)": "average_forgetting", "Task-IL Avg (%)": "task_il_avg_incremental_accuracy",
           "Task-IL Last (%)": "task_il_last_accuracy"}


def _check_table(rows: list[list[str]], table_csv: dict[str, dict[str, str]]) -> int:
    header, body = rows[1], rows[2:]  # row 0: the protocol group
    checked = 0
    for row in body:
        label, cells = row[0], dict(zip(header, row[1:]))
        for column, field in COLUMNS.items():
            assert cells[column] == _pm(table_csv[label][f"{field}_mean"], table_csv[label][f"{field}_std"]), \
                (label, column)
            checked += 1
    assert {r[0] for r in body} == set(table_csv)
    return checked


def test_run_writes_one_self_contained_page_whose_table_is_table_csv(results):
    page = _parse(results / "report.html")
    assert page.scripts == 0 and page.external == []  # nothing to fetch, nothing to run
    # every figure embedded: two curves, forgetting, performance drop, and one matrix per label
    assert len(page.images) == 2 + 1 + 1 + 2
    for src in page.images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(page.links) <= page.ids  # every link lands somewhere on the page
    assert {"runs-quickdraw20_2x10-maxtrain-8-finetune-epochs-1", "runs-quickdraw20_2x10-maxtrain-8-icarl-epochs-1"} <= page.ids
    assert _check_table(page.rows, _csv(results / "table.csv")) == 2 * len(COLUMNS)


def test_report_command_prints_the_same_page(results, capsys):
    capsys.readouterr()
    assert main(["report", str(results), "--format", "html"]) == 0
    printed = capsys.readouterr().out
    assert printed == (results / "report.html").read_text(encoding="utf-8")


def _browser():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium not installed (.ci/run installs it)")
    if not (chromium and driver):
        pytest.skip("chromium and chromedriver not installed (.ci/run installs them from Debian)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,1000"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=webdriver.ChromeService(executable_path=driver), options=options)


REFERENCE = Path(__file__).resolve().parents[1] / "results" / "reference" / "quickdraw100_10x10"


def test_the_page_renders_in_headless_chromium(results, tmp_path):
    _renders(results, len(list((results / "plots").glob("*.png"))), tmp_path)


@pytest.mark.skipif(not (REFERENCE / "report.html").exists(), reason="no reference report in this checkout")
def test_the_reference_report_renders_in_headless_chromium(tmp_path):
    figures = len(list((REFERENCE / "plots").glob("*.png")))
    assert figures > 10
    _renders(REFERENCE, figures, tmp_path)


def test_the_reference_figures_are_those_of_the_reference_page():
    """A figure left in plots/ by a run no longer in the results would be shown by no page (checked without a
    browser, so a checkout without chromium catches it too)."""
    for report in sorted(REFERENCE.parent.glob("*/report.html")):
        pngs = len(list((report.parent / "plots").glob("*.png")))
        assert report.read_text(encoding="utf-8").count("<img") == pngs, report.parent.name


def _renders(results: Path, n_images: int, tmp_path: Path) -> None:
    """No console error, every figure decoded and shown, the table's cells those of table.csv."""
    browser = _browser()
    try:
        browser.get((results / "report.html").resolve().as_uri())
        errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        assert errors == []
        images = browser.find_elements("tag name", "img")
        assert len(images) == n_images
        for img in images:  # decoded, with a size, shown
            browser.execute_script("arguments[0].scrollIntoView();", img)
            assert browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0;", img)
            assert img.is_displayed() and img.size["width"] > 100 and img.size["height"] > 100
        rows = [[c.text for c in r.find_elements("css selector", "th, td")]
                for r in browser.find_elements("css selector", "#paper-table tr")]
        table_csv = _csv(results / "table.csv")
        assert _check_table(rows, table_csv) == len(table_csv) * len(COLUMNS)
        assert browser.save_screenshot(str(tmp_path / "report.png"))
    finally:
        browser.quit()


# ---------------------------------------------------------------- pages of hand-made runs (nothing trains)

NAME = "LwF + ER, one epoch (the quick row)"
LABEL = "lwf_er+epochs=1+kd_lambda=2+memory=100"


def _fake_results(root: Path) -> Path:
    """A protocol folder with two finished rows (one named by an experiment file) and one failed run."""
    folder = root / "toy"
    for label, wall in ((LABEL, 12.5), ("finetune", 3 * 3600.0)):
        d = folder / label / "seed0"
        d.mkdir(parents=True)
        a = [[90.0], [40.0, 85.0]]
        (d / "summary.json").write_text(json.dumps(
            {"protocol": "toy", "label": label, "method": label.split("+")[0], "seed": 0, "classes_seen": [10, 20],
             "wall_time_s": wall, **summarise(a, [90.0, 62.5])}))
        (d / "config.json").write_text(json.dumps(
            {"label": label, "command": f"{root}/harness/__main__.py run --out {root} --quiet",
             "data_root": str(root / "data"), "url": "https://example.org/x", "environment": {"python": "3.11"}}))
    failed = folder / "icarl" / "seed0"
    failed.mkdir(parents=True)
    (failed / "error.json").write_text(json.dumps({"label": "icarl", "seed": 0, "message": "CUDA out of memory"}))
    return folder


def _named(folder: Path):
    runs = report.collect_runs([folder])
    runs.attrs["names"] = {LABEL: NAME}
    return runs


def test_page_paths_are_relative_to_its_folder(tmp_path):
    folder = _fake_results(tmp_path / "results")
    html_report.write_report(_named(folder), folder, embedded=[])
    page = (folder / "report.html").read_text(encoding="utf-8")
    assert str(tmp_path) not in page  # no absolute path: not the runs', the failed run's, nor the configs'
    assert f">{LABEL}/seed0<br>" in page and "finetune/seed0" in page
    assert "icarl/seed0/error.json" in page and "CUDA out of memory" in page
    assert "../harness/__main__.py run --out .. --quiet" in page and "https://example.org/x" in page
    # a page printed from the folder it would be written to is the same page
    assert html_report.render(_named(folder), "html", embedded=[]) == page
    # written elsewhere, its paths start there
    html_report.write_report(_named(folder), tmp_path / "elsewhere", formats=("html",), embedded=[])
    assert "../results/toy/finetune/seed0" in (tmp_path / "elsewhere" / "report.html").read_text(encoding="utf-8")


def test_page_wall_times_read_as_the_table_s(tmp_path):
    runs = _named(_fake_results(tmp_path))
    page = html_report.render(runs, "html", embedded=[])
    assert "Last 62.5, 12.5 s</summary>" in page and "Last 62.5, 3.0 h</summary>" in page
    assert " min</summary>" not in page  # 12.5 s read "0.2 min"
    table = report.paper_table(runs)
    assert table.loc[NAME, ("toy", "Wall time")] == "12.5 s" and table.loc["finetune", ("toy", "Wall time")] == "3.0 h"


def test_page_names_rows_and_captions_as_the_experiment_file(tmp_path):
    runs = _named(_fake_results(tmp_path))
    embedded: list = []
    write_figures(runs, tmp_path / "plots", embedded)
    page = html_report.render(runs, "html", embedded=embedded)
    captions = re.findall(r"<figcaption>(.*?)</figcaption>", page)
    assert any(c.startswith(html.escape(NAME)) for c in captions)
    assert not any(LABEL in c for c in captions)  # the raw label is no caption
    assert f'alt="accuracy matrix of {html.escape(NAME)}"' in page
    assert re.search(rf"<h3[^>]*>toy · {re.escape(html.escape(NAME))} <span", page)  # the runs' heading too


def test_report_render_leaves_the_page_to_html_report(tmp_path):
    runs = _named(_fake_results(tmp_path))
    with pytest.raises(HarnessError, match="html_page"):
        report.render(runs, "html")
    assert report.render(runs, "html", embedded=[], page=html_report.html_page).startswith("<!DOCTYPE html>")
    assert html_report.render(runs, "md") == report.render(runs, "md")
