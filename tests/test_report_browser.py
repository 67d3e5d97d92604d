"""The report of the tiny study, opened in a real headless browser (Debian's chromium).

report.html is a React app: its figures and tables exist only after its JavaScript ran. The test
therefore renders it in chromium and asserts on the rendered DOM. A small probe script, appended to
a copy of the report, walks the page as a reader would — it clicks each result category (and
subcategory) in the side bar, reads the results table the app renders there, and clicks the first
figure's "view" button — then writes what it saw as JSON into the DOM, which `--dump-dom` returns.
A screenshot of the same walk (ending on the first figure) is kept under tests/artifacts/.
"""

from __future__ import annotations

import ast
import html
import json
import os
import re
import shutil
import struct
import subprocess
import tempfile
import zlib
from pathlib import Path

import pytest

from tests.workflow_helpers import tiny_study  # noqa: F401

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "tests" / "artifacts"

# The flags under which Debian's chromium runs as root in a closed-network container.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--window-size=1400,1000",
]

# Clicks through the app and serialises what the rendered DOM shows into <pre id="flatness-probe">.
PROBE_JS = r"""
(function () {
  const out = { menu: [], views: [], images: [], errors: [], front: null };
  const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
  const nav = () => document.querySelector("nav");
  const links = () => Array.from(nav().querySelectorAll("ul li a"));
  const labels = () => links().map((a) => a.textContent.trim());
  const click = (el) => el.dispatchEvent(new MouseEvent("click", { bubbles: true, cancelable: true }));
  const home = () => click(nav().querySelector("ol li a"));  // breadcrumb "home"
  function table() {
    const t = nav().querySelector("table");
    if (!t) return null;
    return {
      headers: Array.from(t.querySelectorAll("thead th")).map((x) => x.textContent.trim()),
      rows: Array.from(t.querySelectorAll("tbody tr")).map((tr) =>
        Array.from(tr.querySelectorAll("td")).map((x) => x.textContent.trim())),
    };
  }
  async function goto(path) {
    home(); await sleep(200);
    for (const label of path) {
      const a = links().find((x) => x.textContent.trim() === label);
      if (!a) throw new Error("no side-bar link " + JSON.stringify(label) + " on the way to " + path);
      click(a); await sleep(300);
    }
  }
  // Click the "view" (eye) button of each row until the content pane shows an embedded image.
  async function openFirstImage(path) {
    const t = nav().querySelector("table");
    if (!t) return false;
    for (const tr of t.querySelectorAll("tbody tr")) {
      const view = tr.querySelector("td:last-child a");
      if (!view) continue;
      click(view); await sleep(400);
      const img = Array.from(document.querySelectorAll("img[src^='data:image']"))
        .find((x) => !x.closest("nav") && x.complete && x.naturalWidth > 0);
      if (img) {
        out.images.push({ path, row: Array.from(tr.querySelectorAll("td")).map((x) => x.textContent.trim()),
                          width: img.naturalWidth, height: img.naturalHeight });
        return true;
      }
    }
    return false;
  }
  async function run() {
    await sleep(1000);
    // The first page, before any click: the headline and the inlined invariance figure.
    const main = Array.from(document.body.children).filter((x) => !x.contains(nav()));
    const text = main.map((x) => x.textContent).join(" ");
    const imgs = Array.from(document.querySelectorAll("img[src^='data:image/png']"))
      .filter((x) => !x.closest("nav") && x.complete);
    out.front = { headline: text.includes("Headline"), batchTable: /Batch \d+ vs batch \d+/.test(text),
                  images: imgs.map((x) => [x.naturalWidth, x.naturalHeight]) };
    out.menu = labels();
    const general = new Set(["Workflow", "Statistics", "About"]);
    for (const cat of out.menu.filter((l) => !general.has(l))) {
      await goto([cat]);
      const t = table();
      if (t) { out.views.push({ path: [cat], ...t }); await openFirstImage([cat]); continue; }
      for (const sub of labels()) {  // a category with several subcategories lists them first
        await goto([cat, sub]);
        out.views.push({ path: [cat, sub], ...(table() || { headers: [], rows: [] }) });
        await openFirstImage([cat, sub]);
      }
    }
    // Leave the first figure on screen for the screenshot.
    if (out.images.length) { await goto(out.images[0].path); await openFirstImage(out.images[0].path); out.images.pop(); }
  }
  run().catch((e) => out.errors.push(String((e && e.stack) || e))).finally(() => {
    const pre = document.createElement("pre");
    pre.id = "flatness-probe";
    pre.textContent = JSON.stringify(out);
    document.body.appendChild(pre);
  });
})();
"""


def chromium_binary() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def require(ok: bool, reason: str) -> None:
    """In CI a missing prerequisite is a failure (a skip would pass silently), elsewhere a skip."""
    if ok:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: run `make system-deps` as root)")
    pytest.skip(reason)


def run_chromium(args: list[str], user_data_dir: Path, timeout: float = 180) -> str:
    chromium = chromium_binary()
    cmd = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={user_data_dir}", *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{cmd} exited {r.returncode}:\n{r.stderr[-3000:]}"
    return r.stdout


def with_probe(report: Path, dest: Path) -> Path:
    """A copy of the report with PROBE_JS appended before </body> (the original is untouched)."""
    src = report.read_text(encoding="utf-8")
    i = src.rfind("</body>")
    assert i > 0, f"{report} has no </body>"
    dest.write_text(src[:i] + "<script>" + PROBE_JS + "</script>" + src[i:], encoding="utf-8")
    return dest


def render(report: Path, screenshot: Path) -> dict:
    """Render the report with the probe; return what the probe saw, and write a screenshot."""
    with tempfile.TemporaryDirectory(prefix="flatness-chromium-") as tmp:
        tmp = Path(tmp)
        page = with_probe(report, tmp / "report_probe.html").as_uri()
        # Virtual time: the page's timers run as fast as the CPU allows, up to this many ms.
        budget = "--virtual-time-budget=60000"
        dom = run_chromium([budget, "--dump-dom", page], tmp / "profile")
        run_chromium([budget, f"--screenshot={screenshot}", page], tmp / "profile")
    m = re.search(r'<pre id="flatness-probe">(.*?)</pre>', dom, re.S)
    assert m, "the probe never finished: no <pre id=flatness-probe> in the rendered DOM"
    return json.loads(html.unescape(m.group(1)))


def png_stats(path: Path) -> tuple[int, int, int]:
    """(width, height, number of distinct row patterns) of an 8-bit RGB(A) PNG, stdlib only."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    pos, idat, width, height, ctype = 8, b"", 0, 0, 0
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + n]
        if kind == b"IHDR":
            width, height, depth, ctype = struct.unpack(">IIBB", body[:10])
            assert depth == 8 and ctype in (2, 6), f"unexpected PNG format {depth=} {ctype=}"
        elif kind == b"IDAT":
            idat += body
        pos += 12 + n
    raw = zlib.decompress(idat)
    stride = 1 + width * (3 if ctype == 2 else 4)
    # Filtered rows; identical bytes across rows mean a blank band. Distinct rows ≈ visual content.
    rows = {raw[i * stride : (i + 1) * stride] for i in range(height)}
    return width, height, len(rows)


def test_png_stats_tells_blank_from_content(tmp_path):
    """The screenshot check itself can fail: a blank image has one distinct row."""

    def write_png(path, rows):
        w, h = len(rows[0]) // 3, len(rows)
        raw = b"".join(b"\x00" + r for r in rows)

        def chunk(kind, body):
            return (
                struct.pack(">I", len(body))
                + kind
                + body
                + struct.pack(">I", zlib.crc32(kind + body))
            )

        ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
        path.write_bytes(
            b"\x89PNG\r\n\x1a\n"
            + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(raw))
            + chunk(b"IEND", b"")
        )

    write_png(tmp_path / "blank.png", [b"\xff" * 30] * 10)
    write_png(tmp_path / "lines.png", [bytes([i]) * 30 for i in range(10)])
    assert png_stats(tmp_path / "blank.png") == (10, 10, 1)
    assert png_stats(tmp_path / "lines.png") == (10, 10, 10)


def declared_report_items() -> list[dict]:
    """Every ``report(...)`` declared in workflow/rules/*.smk: its path, category and labels."""
    items = []
    for smk in sorted((REPO / "workflow" / "rules").glob("*.smk")):
        text = smk.read_text()
        for m in re.finditer(r"\breport\(", text):
            depth, i = 1, m.end()
            while depth:  # the call's text up to its matching parenthesis
                depth += {"(": 1, ")": -1}.get(text[i], 0)
                i += 1
            call = text[m.end() : i - 1]
            path = re.match(r'\s*"([^"]+)"', call)
            category = re.search(r'category\s*=\s*"([^"]+)"', call)
            labels = re.search(r"labels\s*=\s*(\{[^}]*\})", call)
            if path is None:  # report: "workflow.rst" at top level, not a result
                continue
            items.append(
                {
                    "path": path.group(1),
                    "category": category.group(1) if category else "Other",
                    "labels": ast.literal_eval(labels.group(1)) if labels else {},
                    "where": smk.name,
                }
            )
    return items


def test_declared_report_items_are_found():
    items = declared_report_items()
    assert {i["category"] for i in items} >= {"Figures", "Tables"}
    assert all(i["labels"] for i in items), "every reported item should carry labels"


@pytest.mark.slow
@pytest.mark.browser
def test_report_renders_every_declared_figure_and_table(tiny_study):  # noqa: F811
    require(chromium_binary() is not None, "Debian's chromium is not installed")
    report = tiny_study.report_html
    assert report.is_file()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    screenshot = ARTIFACTS / "report.png"
    screenshot.unlink(missing_ok=True)
    seen = render(report, screenshot)
    (ARTIFACTS / "report_probe.json").write_text(json.dumps(seen, indent=2))
    assert not seen["errors"], seen["errors"]

    # What the study produced and declared for the report (items whose file exists).
    expected = [i for i in declared_report_items() if (tiny_study.workdir / i["path"]).exists()]
    assert len(expected) >= 8, expected
    categories = sorted({i["category"] for i in expected})
    # The side bar lists each category once, under the General entries.
    assert seen["menu"][:3] == ["Workflow", "Statistics", "About"], seen["menu"]
    assert sorted(seen["menu"][3:]) == categories, seen["menu"]

    # Each category's rendered table: one row per reported file, showing its label values,
    # under column headers named after the label keys.
    for cat in categories:
        views = [v for v in seen["views"] if v["path"][0] == cat]
        assert views, f"category {cat!r} rendered nothing"
        rows = [tuple(c for c in row if c) for v in views for row in v["rows"]]
        headers = {h.lower() for v in views for h in v["headers"] if h}
        want = [i for i in expected if i["category"] == cat]
        assert len(rows) == len(want), (cat, rows, want)
        for item in want:
            values = tuple(item["labels"].values())
            assert values in rows, f"{item['path']} ({values}) not listed under {cat}: {rows}"
            assert {k.lower() for k in item["labels"]} <= headers, (cat, headers)

    # The first page states the headline and shows the invariance figure without a click.
    front = seen["front"]
    assert front["headline"] and front["batchTable"], front
    assert any(w >= 400 and h >= 250 for w, h in front["images"]), front

    # Clicking a figure's "view" button shows the embedded PNG at its real size.
    assert seen["images"], "no figure could be opened in the content pane"
    assert any(i["path"][0] == "Figures" for i in seen["images"]), seen["images"]
    for img in seen["images"]:  # the first item opened in each category (Curvature, Figures, ...)
        assert img["width"] >= 200 and img["height"] >= 150, img

    # The screenshot (left on that figure) is a real, non-blank picture.
    width, height, distinct_rows = png_stats(screenshot)
    assert (width, height) == (1400, 1000)
    assert distinct_rows > 100, f"screenshot looks blank ({distinct_rows} distinct rows)"
    assert screenshot.stat().st_size > 20_000
