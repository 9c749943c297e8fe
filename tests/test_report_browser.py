"""The report page in a real browser: headless Chromium (Debian's package) opens the one file and
every plot decodes to an image with a real size. Skips, saying why, when no Chromium is installed
(.ci/run installs it)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest
from test_report import CONFIG, paired_lines, write_run  # tests/ is on sys.path (rootdir conftest)

from prefopt.evaluation.report import write_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# appended to a copy of the page: once loaded, each image's decoded size is written into the DOM
PROBE = """<script>window.addEventListener("load", () => {
  const sizes = [...document.images].map(i => [i.alt, i.complete, i.naturalWidth, i.naturalHeight]);
  const out = document.createElement("pre"); out.id = "probe"; out.textContent = JSON.stringify(sizes);
  document.body.appendChild(out);
});</script>"""


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium here (apt-get install chromium); the browser check skips")
def test_every_plot_renders_in_headless_chromium(tmp_path):
    index = write_report(write_run(tmp_path / "run", paired_lines(), CONFIG))
    page = tmp_path / "probe" / "index.html"  # a copy of the one file, alone in its folder
    page.parent.mkdir()
    page.write_text(index.read_text().replace("</body>", PROBE + "</body>"))
    dom = subprocess.run(
        [
            CHROMIUM,
            *FLAGS,
            f"--user-data-dir={tmp_path / 'profile'}",
            "--virtual-time-budget=10000",
            "--dump-dom",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    found = re.search(r'<pre id="probe">(.*?)</pre>', dom, re.S)
    assert found, dom[-2000:]
    sizes = json.loads(found.group(1).replace("&quot;", '"'))
    assert len(sizes) == 9
    for alt, complete, width, height in sizes:
        assert complete and width >= 400 and height >= 200, alt
