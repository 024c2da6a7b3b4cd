"""A browser smoke test: JupyterLab serves a notebook of the project and headless Chromium renders it with its prose
and its committed outputs, as a reader's browser would. Optional: skipped, saying why, on a machine without Chromium
(Debian and Ubuntu: `apt-get install chromium`) or without JupyterLab (the dev extra)."""
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BROWSER = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
NEEDS_BROWSER = pytest.mark.skipif(BROWSER is None, reason="no Chromium on this machine (apt-get install chromium): "
                                                           "the browser smoke test is skipped")
NOTEBOOK = "index.ipynb"  # short, with a title, prose, a table and a printed output


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); return s.getsockname()[1]


def expected(nb: dict) -> tuple[str, str]:
    "The notebook's one-line summary (the `> ...` line of its title cell) and the first line its first output printed."
    title = "".join(nb["cells"][1 if nb["cells"][0]["cell_type"] == "code" else 0]["source"])
    summary = next(l[2:].strip() for l in title.splitlines() if l.startswith("> "))
    out = next("".join(o["text"]) for c in nb["cells"] if c["cell_type"] == "code" for o in c.get("outputs", [])
               if o.get("output_type") == "stream")
    return summary, out.splitlines()[0].strip()


@pytest.fixture
def lab(tmp_path):
    "A JupyterLab server on 127.0.0.1 serving a copy of one notebook; yields its URL and the copy's path."
    pytest.importorskip("jupyterlab", reason="JupyterLab is not installed (pip install -e '.[dev]')")
    root = tmp_path / "root"; (root / "nbs").mkdir(parents=True)
    nb = Path(shutil.copy(ROOT / "nbs" / NOTEBOOK, root / "nbs"))
    port, token = free_port(), secrets.token_hex(16)
    env = dict(os.environ, JUPYTER_CONFIG_DIR=str(tmp_path / "config"), JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"))
    log = open(tmp_path / "lab.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root", "--ServerApp.ip=127.0.0.1",
                             f"--ServerApp.port={port}", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
                             f"--LabApp.workspaces_dir={tmp_path / 'workspaces'}"],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status?token={token}", timeout=5) as r:
                    if r.status == 200: break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"JupyterLab did not start: {(tmp_path / 'lab.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield f"http://127.0.0.1:{port}/lab/tree/nbs/{NOTEBOOK}?token={token}", nb
    finally:
        proc.terminate()
        try: proc.wait(timeout=30)
        except subprocess.TimeoutExpired: proc.kill()
        log.close()


@NEEDS_BROWSER
def test_a_notebook_renders_in_a_headless_browser(lab, tmp_path):
    url, nb = lab
    before = nb.read_bytes()
    summary, output = expected(json.loads(before))
    dom = subprocess.run([BROWSER, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'chromium'}",
                          "--virtual-time-budget=30000", "--dump-dom", url], capture_output=True, text=True, timeout=240).stdout
    assert "jp-Notebook" in dom, "JupyterLab did not open the notebook"
    assert "jp-RenderedMarkdown" in dom and summary in dom, "the notebook's prose is not rendered"
    assert "jp-OutputArea-output" in dom and output in dom, "the notebook's committed output is not shown"
    assert nb.read_bytes() == before, "opening the notebook changed the file"


def test_expected_reads_the_title_line_and_the_first_output():  # a plain unit test: it runs with or without a browser
    nb = {"cells": [{"cell_type": "code", "source": ["#| hide"], "outputs": []},
                    {"cell_type": "markdown", "source": ["# t\n", "\n", "> one line\n"]},
                    {"cell_type": "code", "source": ["print(1)"], "outputs": [{"output_type": "stream", "text": ["a b\n", "c\n"]}]}]}
    assert expected(nb) == ("one line", "a b")
