"""Render the notebooks, with their committed outputs, into a static HTML book that opens in any browser, offline.

    python scripts/build_book.py                 every notebook of nbs/ into _docs/ (settings.ini's doc_path);
                                                 then open _docs/index.html (a file:// address: no server needed)
    python scripts/build_book.py --out DIR       into DIR instead
    python scripts/build_book.py NB [NB ...]     only these notebooks (the contents page still lists every notebook)

The contents page (index.html) follows the map of notebooks in nbs/index.ipynb (its table rows, in order); notebooks
the map does not name come last, and nbs/index.ipynb itself is the page readme.html. Every page links to the previous
and the next page and to the contents, and a notebook named in the prose (`05_loss.ipynb` or `05_loss` in a code span,
or a markdown link to it) links to its page. Nothing is executed: the pages show the outputs committed with the
notebooks (scripts/run_notebooks.py makes them). Figures are embedded in the pages as data URIs. Equations are typeset
in the browser by MathJax 2.7 from the jupyter-server-mathjax package (in the dev extra), copied beside the pages, so a
page loads nothing from the network: no CDN, no web font service (tests/test_book.py checks it).
"""
import argparse
import html
import json
import re
import shutil
import sys
from configparser import ConfigParser
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parent.parent
NBS = ROOT / "nbs"
MATHJAX_CONFIG = "TeX-AMS-MML_HTMLorMML-full,Safe"  # the combined configuration the package ships (HTML-CSS output)
MATHJAX_SKIP = ("localization", "jax/output/SVG", "extensions/a11y/mathmaps", "extensions/a11y/mathjax-sre.js")  # loaded
# only on a reader's request from MathJax's menu (another language, SVG fonts without the SVG renderer, speech)
README_PAGE = "readme"  # nbs/index.ipynb's page: index.html is the contents

# The lab template without what it would fetch from a CDN: require.js (for widgets, which no notebook here has), the
# widget manager and mermaid.js; MathJax from the copy beside the pages, told that its web fonts are STIX-Web (the only
# ones the package ships: MathJax's default, TeX, would fall back to the reader's system fonts), as Jupyter's classic
# notebook configures it; a bar of links at the top and at the bottom of every page.
TEMPLATE = r"""{%- extends 'index.html.j2' -%}
{%- block html_head_js_requirejs -%}{%- endblock html_head_js_requirejs -%}
{% block jupyter_widgets %}{% endblock jupyter_widgets %}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
{%- block html_head_js_mathjax -%}
<script type="text/x-mathjax-config">
MathJax.Hub.Config({
  tex2jax: {inlineMath: [['$', '$'], ['\\(', '\\)']], displayMath: [['$$', '$$'], ['\\[', '\\]']], processEscapes: true,
            processEnvironments: true},
  TeX: {equationNumbers: {autoNumber: "AMS", useLabelIds: true}},
  "HTML-CSS": {availableFonts: [], imageFont: null, preferredFont: null, webFont: "STIX-Web", linebreaks: {automatic: true}},
  displayAlign: "center", messageStyle: "none"
});
</script>
<script src="{{ resources.mathjax_url }}"></script>
{%- endblock html_head_js_mathjax -%}
{% block extra_css %}<style type="text/css">
nav.book-nav { display: flex; justify-content: space-between; gap: 1em; max-width: 1100px; margin: 0.5em auto;
  padding: 0.4em 1em; font-family: var(--jp-ui-font-family); font-size: 14px; border-bottom: 1px solid #ddd; }
nav.book-nav.bottom { border-bottom: none; border-top: 1px solid #ddd; }
</style>{% endblock extra_css %}
{%- block body_header -%}{{ super() }}{{ resources.book_nav }}{%- endblock body_header -%}
{% block body_footer %}{{ resources.book_nav_bottom }}{{ super() }}{% endblock body_footer %}
"""


def doc_path() -> Path:
    "settings.ini's doc_path, where nbdev puts rendered documentation (ignored by git)."
    cfg = ConfigParser(); cfg.read(ROOT / "settings.ini")
    return ROOT / cfg["DEFAULT"].get("doc_path", "_docs")


def mathjax_dir() -> Path:
    "MathJax 2.7's files, from the jupyter-server-mathjax package."
    try:
        import jupyter_server_mathjax
    except ImportError:
        raise SystemExit("build_book needs MathJax from the jupyter-server-mathjax package, which the dev extra installs: "
                         "pip install -e '.[dev]' (or pip install jupyter-server-mathjax)") from None
    path = Path(jupyter_server_mathjax.__file__).parent / "static"
    if not (path / "MathJax.js").is_file(): raise SystemExit(f"no MathJax.js in {path}: reinstall jupyter-server-mathjax")
    return path


def map_order(index: Path = NBS / "index.ipynb") -> list[str]:
    "The notebooks named in the first column of the map's table rows in nbs/index.ipynb, in order."
    nb = json.loads(index.read_text())
    text = "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "markdown")
    return list(dict.fromkeys(re.findall(r"^\|\s*`([\w.-]+)\.ipynb`\s*\|", text, flags=re.M)))


def title_and_summary(nb: dict, stem: str) -> tuple[str, str]:
    "The notebook's `# Title` and its one-line `> summary`."
    for c in nb["cells"]:
        if c["cell_type"] != "markdown": continue
        src = "".join(c["source"])
        title = re.search(r"^# (.+)$", src, flags=re.M)
        if title:
            summary = re.search(r"^> (.+)$", src, flags=re.M)
            return title.group(1).strip(), summary.group(1).strip() if summary else ""
    return stem, ""


def page_name(stem: str) -> str: return README_PAGE if stem == "index" else stem


def for_readers(nb):
    "The notebook as nbdev's documentation shows it: `#| hide` cells left out, `#| output: asis` cells as their markdown."
    cells = []
    for c in nb.cells:
        src = c.source.lstrip()
        if c.cell_type == "code" and re.match(r"#\|\s*hide\s*$", src.splitlines()[0] if src else ""): continue
        if c.cell_type == "code" and re.search(r"^#\|\s*output:\s*asis\s*$", c.source, flags=re.M):
            text = "".join(o.get("text", "") for o in c.get("outputs", []) if o.get("output_type") == "stream")
            cells.append(nbformat.v4.new_markdown_cell(text)); continue
        cells.append(c)
    nb.cells = cells
    return nb


def link_notebooks(body: str, pages: set[str]) -> str:
    "Links between pages: markdown links to NB.ipynb, and notebooks named in code spans (`05_loss.ipynb`, `05_loss`)."
    def href(stem): return f"{page_name(stem)}.html"
    body = re.sub(r'href="(?:\.?/)?(?:nbs/)?([\w.-]+)\.ipynb(#[^"]*)?"',
                  lambda m: f'href="{href(m.group(1))}{m.group(2) or ""}"' if m.group(1) in pages else m.group(0), body)
    return re.sub(r"(?<!\.html\">)<code>((?:nbs/)?([\w.-]+?)(?:\.ipynb)?)</code>",  # not one already in a link
                  lambda m: f'<a href="{href(m.group(2))}"><code>{m.group(1)}</code></a>' if m.group(2) in pages else m.group(0),
                  body)


def nav(entries: list[tuple[str, str]], i: int, where: str = "") -> str:
    "The bar of links of page `i`: previous, contents, next."
    def a(j, arrow):
        if not 0 <= j < len(entries): return "<span></span>"
        name, title = entries[j]
        return f'<a href="{name}.html">{arrow} {html.escape(title)}</a>' if arrow == "&larr;" else \
               f'<a href="{name}.html">{html.escape(title)} {arrow}</a>'
    return f'<nav class="book-nav {where}">{a(i - 1, "&larr;")}<a href="index.html">Contents</a>{a(i + 1, "&rarr;")}</nav>'


def contents_page(rows: list[dict]) -> str:
    "index.html: every notebook in the map's order, with its title, summary and module."
    items = "\n".join(
        f'<li><a href="{r["page"]}.html"><b>{html.escape(r["title"])}</b></a> <code>{r["stem"]}.ipynb</code>'
        f'<br><span class="summary">{html.escape(r["summary"])}</span></li>' for r in rows)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1.0">
<title>relicv2: the notebooks as a book</title>
<style>
body {{ font-family: system-ui, -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; max-width: 60em; margin: 2em auto;
  padding: 0 1em; line-height: 1.45; color: #222; }}
li {{ margin: 0.6em 0; }} .summary {{ color: #555; }} code {{ font-size: 0.9em; color: #666; }}
</style></head>
<body><h1>relicv2: the notebooks as a book</h1>
<p>A literate PyTorch reproduction of ReLICv2 (Tomasev et al. 2022, arXiv 2201.05119). Every page below is a notebook
of <code>nbs/</code> with the outputs committed with it, in the order of the map of notebooks in the README; the
pages open from disk in any browser and load nothing from the network. Start with the method in one page.</p>
<ol>
{items}
</ol>
<p class="summary">Built by <code>python scripts/build_book.py</code> from the committed notebooks.</p>
</body></html>
"""


def build(out: Path, only: list[str] | None = None, quiet: bool = False) -> list[Path]:
    "Write the book into `out` (the contents, a page per notebook or per notebook of `only`, MathJax); returns the pages."
    from jinja2 import DictLoader
    from nbconvert import HTMLExporter

    mathjax = mathjax_dir()
    on_map = [s for s in map_order() if (NBS / f"{s}.ipynb").is_file()]
    stems = ["index"] + on_map + sorted(p.stem for p in NBS.glob("*.ipynb") if p.stem not in on_map and p.stem != "index")
    nbs = {s: json.loads((NBS / f"{s}.ipynb").read_text()) for s in stems}
    rows = [dict(stem=s, page=page_name(s), **dict(zip(("title", "summary"), title_and_summary(nbs[s], s)))) for s in stems]
    if only is not None:
        unknown = [s for s in only if s not in stems]
        if unknown: raise SystemExit(f"no such notebook in nbs/: {', '.join(unknown)} (give names like 05_loss or 05_loss.ipynb)")
    out.mkdir(parents=True, exist_ok=True)
    mj = out / "mathjax"
    if mj.exists(): shutil.rmtree(mj)
    shutil.copytree(mathjax, mj, ignore=lambda d, names: [n for n in names
                    if Path(d, n).relative_to(mathjax).as_posix() in MATHJAX_SKIP])

    exporter = HTMLExporter(template_name="lab", extra_loaders=[DictLoader({"book.html.j2": TEMPLATE})],
                            template_file="book.html.j2", embed_images=True,
                            exclude_input_prompt=True, exclude_output_prompt=True,
                            mathjax_url=f"mathjax/MathJax.js?config={MATHJAX_CONFIG}")
    entries = [(r["page"], r["title"]) for r in rows]
    written = []
    for i, r in enumerate(rows):
        if only is not None and r["stem"] not in only: continue
        nb = for_readers(nbformat.reads(json.dumps(nbs[r["stem"]]), as_version=4))
        nb.metadata["title"] = r["title"]
        body, _ = exporter.from_notebook_node(nb, resources={
            "metadata": {"name": r["stem"], "path": str(NBS)},
            "book_nav": nav(entries, i), "book_nav_bottom": nav(entries, i, "bottom")})
        page = out / f"{r['page']}.html"
        page.write_text(link_notebooks(body, set(stems)), encoding="utf-8")
        written.append(page)
        if not quiet: print(f"{r['stem']}.ipynb -> {page.relative_to(out)} ({page.stat().st_size // 1024} KB)")
    (out / "index.html").write_text(contents_page(rows), encoding="utf-8")
    return [out / "index.html"] + written


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("notebooks", nargs="*", help="only these notebooks (names like 05_loss or nbs/05_loss.ipynb)")
    ap.add_argument("--out", type=Path, default=None, help="output folder (default: settings.ini's doc_path, _docs)")
    args = ap.parse_args(argv)
    out = args.out or doc_path()
    only = [Path(n).stem for n in args.notebooks] or None
    pages = build(out, only)
    print(f"{len(pages)} pages in {out}; open {(out / 'index.html').resolve().as_uri()}")


if __name__ == "__main__":
    sys.exit(main())
