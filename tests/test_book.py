"""The notebooks as a static book (scripts/build_book.py), built into a temporary folder: no page loads a script, a style,
a font or an image from the network, figures are embedded, the contents follow the map of nbs/index.ipynb and every
link between pages resolves; where Chromium is installed (Debian and Ubuntu: `apt-get install chromium`; CI installs
it), a page opened from disk headless, with every host name unresolvable, shows its title, typeset equations and a
figure. Needs the dev extra (nbconvert, and MathJax from jupyter-server-mathjax)."""
import base64
import importlib.util
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BROWSER = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
pytest.importorskip("nbconvert", reason="nbconvert is not installed (pip install -e '.[dev]')")
pytest.importorskip("jupyter_server_mathjax", reason="jupyter-server-mathjax is not installed (pip install -e '.[dev]')")

spec = importlib.util.spec_from_file_location("build_book", ROOT / "scripts" / "build_book.py")
build_book = importlib.util.module_from_spec(spec); spec.loader.exec_module(build_book)
REMOTE = re.compile(r"^\s*(?:[a-z][a-z0-9+.-]*:)?//", re.I)  # http://, https://, file://..., and //host (scheme-relative)
LOADS = {"script": ("src",), "link": ("href",), "img": ("src", "srcset"), "iframe": ("src",), "source": ("src", "srcset"),
         "audio": ("src",), "video": ("src", "poster"), "embed": ("src",), "object": ("data",), "input": ("src",)}


class Page(HTMLParser):
    "What a page would load (by tag and attribute, CSS url() and @import, inline scripts), its links and its title."
    def __init__(self):
        super().__init__(); self.loads, self.links, self.styles, self.scripts, self.title, self._in = [], [], [], [], "", None
    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.loads += [(tag, k, a[k]) for k in LOADS.get(tag, ()) if a.get(k)]
        if tag == "a" and a.get("href"): self.links.append(a["href"])
        if a.get("style"): self.styles.append(a["style"])
        self._in = tag
    def handle_endtag(self, tag): self._in = None
    def handle_data(self, data):
        if self._in == "style": self.styles.append(data)
        elif self._in == "script": self.scripts.append(data)
        elif self._in == "title": self.title += data


def parse(path: Path) -> Page:
    p = Page(); p.feed(path.read_text(encoding="utf-8")); return p


@pytest.fixture(scope="module")
def book(tmp_path_factory):
    "The whole book, built once from the committed notebooks."
    out = tmp_path_factory.mktemp("book")
    pages = build_book.build(out, quiet=True)
    return out, pages


def test_no_page_loads_anything_from_the_network(book):
    out, pages = book
    assert len(pages) == len(list((ROOT / "nbs").glob("*.ipynb"))) + 1, "a page per notebook, and the contents"
    for path in pages:
        page = parse(path)
        remote = [(t, k, v[:80]) for t, k, v in page.loads if REMOTE.match(v)]
        assert not remote, f"{path.name} loads from the network: {remote}"
        css = [u for s in page.styles for u in re.findall(r"(?:url\(\s*['\"]?|@import\s+['\"])([^'\")\s]+)", s) if REMOTE.match(u)]
        assert not css, f"{path.name}: a style loads {css[:3]}"
        assert not [s for s in page.scripts if re.search(r"https?://|import\(", s)], f"{path.name}: an inline script fetches"
        images = [v for t, k, v in page.loads if t == "img"]
        assert all(v.startswith("data:image/") for v in images), f"{path.name}: a figure is not embedded"
        local = [v.split("?")[0] for t, k, v in page.loads if not v.startswith("data:")]
        assert all((out / v).is_file() for v in local), f"{path.name}: a local file is missing: {local}"
    assert (out / "mathjax" / "MathJax.js").is_file() and list((out / "mathjax" / "fonts").rglob("*.woff"))


def test_contents_follow_the_map_and_every_link_resolves(book):
    out, pages = book
    contents = parse(out / "index.html")
    stems = [l[:-len(".html")] for l in contents.links]
    on_map = [s for s in build_book.map_order() if (ROOT / "nbs" / f"{s}.ipynb").is_file()]
    assert on_map and "05_loss" in on_map, "the map of notebooks in nbs/index.ipynb was not found"
    assert stems[:1 + len(on_map)] == ["readme"] + on_map, "the contents are not in the map's order"
    assert sorted(stems) == sorted(p.stem for p in pages if p.name != "index.html")
    for path in pages:
        for href in parse(path).links:
            if REMOTE.match(href) or href.startswith(("#", "mailto:")): continue
            assert (out / href.split("#")[0]).is_file(), f"{path.name} links to a missing page: {href}"
    paper = parse(out / "00_paper.html")
    assert "05_loss.html" in paper.links and "08_distributed.html" in paper.links, "notebooks named in the prose are not linked"
    for stem in ("00_paper", "05_loss", "08_distributed"):
        figures = [v for t, k, v in parse(out / f"{stem}.html").loads if t == "img"]
        assert figures and all(base64.b64decode(v.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n" for v in figures), stem


@pytest.mark.skipif(BROWSER is None, reason="no Chromium on this machine (apt-get install chromium): the rendering check "
                                           "is skipped")
def test_a_page_renders_offline_in_headless_chromium(book, tmp_path):
    out, _ = book
    page = out / "05_loss.html"
    dom = subprocess.run([BROWSER, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'chromium'}",
                          "--host-resolver-rules=MAP * ~NOTFOUND", "--virtual-time-budget=30000", "--dump-dom", page.as_uri()],
                         capture_output=True, text=True, timeout=240).stdout
    title = build_book.title_and_summary(__import__("json").loads((ROOT / "nbs" / "05_loss.ipynb").read_text()), "05_loss")[0]
    assert f"<title>{title}</title>" in dom and title == "The ReLICv2 loss", "the page's title is missing"
    assert dom.count('class="MathJax_Display"') >= 5 and dom.count('class="MathJax"') >= 50, "equations were not typeset"
    assert 'class="MathJax_Error"' not in dom and "Math Processing Error" not in dom, "MathJax failed on an equation"
    assert "STIXMathJax_Main" in dom, "the equations are not set in the book's own web font"
    assert re.search(r'<img[^>]+src="data:image/png;base64,', dom), "the figure is missing"
    assert 'href="06_target.html"' in dom, "the link to the next page is missing"
