"""Slow: the run report as a person sees it, in a real headless browser (Debian's chromium)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import REPO, T0_MIX

pytestmark = pytest.mark.slow
PROBE = (
    "<script>window.addEventListener('load', () => {"
    " const broken = [...document.images].filter(i => !(i.complete && i.naturalWidth > 0));"
    " document.title = 'images ' + document.images.length + ' broken ' + broken.length; });</script>"
)


@pytest.fixture(scope="module")
def chromium() -> str:
    found = shutil.which("chromium")
    if found is None and os.geteuid() == 0:  # make test-slow on a fresh machine: Debian's package
        subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", "chromium"], capture_output=True)
        found = shutil.which("chromium")
    if found is None:
        pytest.fail("no chromium: install Debian's chromium package (apt-get install chromium) to run this test")
    return found


def test_the_report_opens_in_a_browser_with_every_image_loaded_and_content_drawn(chromium, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    with open(T0_MIX) as f:
        prompts.write_text("".join(next(f) for _ in range(12)))
    out = tmp_path / "run"
    job = [sys.executable, "jobs/generate.py", f"dataset.path={prompts}", "generation.max_new_tokens=8"]
    job += ["batching.shard_size=4", "batching.max_batch_size=2", f"output.dir={out}"]
    assert subprocess.run(job, cwd=REPO, capture_output=True, timeout=600).returncode == 0
    report = subprocess.run([sys.executable, "jobs/report.py", f"output.dir={out}"], cwd=REPO, capture_output=True)
    assert report.returncode == 0, report.stderr[-2000:]

    page = out / "_report" / "report.html"
    probed = tmp_path / "probed.html"  # the same page, telling in its title how many images loaded
    probed.write_text(page.read_text().replace("<title>runner report</title>", "<title>loading</title>" + PROBE))
    browser = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=10000"]
    dom = subprocess.run([*browser, "--dump-dom", probed.as_uri()], capture_output=True, text=True, timeout=120)
    assert "<title>images 5 broken 0</title>" in dom.stdout, dom.stdout[:500] + dom.stderr[-1000:]

    shot = tmp_path / "report.png"
    subprocess.run(
        [*browser, "--window-size=1100,4000", f"--screenshot={shot}", page.as_uri()], capture_output=True, timeout=120
    )
    import matplotlib.image

    pixels = matplotlib.image.imread(str(shot))[..., :3]
    assert pixels.shape[0] >= 4000 and pixels.shape[1] >= 1100
    drawn = (pixels < 0.9).any(axis=2)  # anything not white: text, axes, bars, lines
    assert drawn.mean() > 0.02, "the page rendered (nearly) blank"
    rows_drawn = drawn.any(axis=1)
    assert rows_drawn[: len(rows_drawn) // 2].mean() > 0.3  # content fills the page, not one corner
