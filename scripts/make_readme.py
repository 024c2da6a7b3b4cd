"""Write README.md from nbs/index.ipynb (Quarto, which `nbdev_readme` needs, cannot be installed here).

Markdown cells are copied; code cells are shown with their text outputs, except cells marked `#| hide`; a cell marked
`#| output: asis` contributes only what it printed, as Markdown (a table or a sentence computed from results files).
Usage: python scripts/make_readme.py [--check]   (--check: exit 1 if README.md is out of date)
"""
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HEADER = "<!-- Generated from nbs/index.ipynb by scripts/make_readme.py: edit the notebook, not this file. -->\n\n"


def _text(x):
    return "".join(x) if isinstance(x, list) else x


def render(nb_path: Path) -> str:
    "The README text for the notebook at `nb_path`."
    cells = json.loads(nb_path.read_text(encoding="utf-8"))["cells"]
    parts = []
    for cell in cells:
        src = _text(cell["source"]).strip("\n")
        if cell["cell_type"] == "markdown":
            parts.append(src)
            continue
        if cell["cell_type"] != "code":
            continue
        lines = src.splitlines()
        directives = [l.strip().replace(" ", "") for l in lines if l.strip().startswith("#|")]
        if "#|hide" in directives:
            continue
        if "#|output:asis" in directives:  # computed Markdown: the output, not the code
            parts.append("".join(_text(o.get("text", "")) for o in cell.get("outputs", []) if o.get("output_type") == "stream").strip("\n"))
            continue
        code = "\n".join(l for l in lines if not l.strip().startswith("#|")).strip("\n")
        if code:
            parts.append(f"```python\n{code}\n```")
        out = "".join(_text(o.get("text", "")) if o.get("output_type") == "stream"
                      else _text(o.get("data", {}).get("text/plain", ""))
                      for o in cell.get("outputs", []) if o.get("output_type") in ("stream", "execute_result"))
        if out.strip():
            parts.append(f"```\n{out.rstrip()}\n```")
    return HEADER + "\n\n".join(parts) + "\n"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    text = render(ROOT / "nbs" / "index.ipynb")
    readme = ROOT / "README.md"
    if "--check" in argv:
        if not readme.exists() or readme.read_text(encoding="utf-8") != text:
            print("README.md is out of date: run `python scripts/make_readme.py`", file=sys.stderr)
            return 1
        return 0
    readme.write_text(text, encoding="utf-8")
    print(f"wrote {readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
