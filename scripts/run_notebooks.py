"""Execute the notebooks in a real Jupyter kernel, as JupyterLab's "Run All" does.

    python scripts/run_notebooks.py [NB ...]          run each notebook (default: every nbs/*.ipynb) top to bottom
                                                      outside tests, write its outputs back and clean it (nbdev_clean):
                                                      how committed outputs are made, so that they match the code
    python scripts/run_notebooks.py --check [NB ...]  run each under IN_TEST (nbdev_test's short path) in a real
                                                      kernel, write nothing, and fail if a cell's text output differs
                                                      from the committed one
    python scripts/run_notebooks.py --check --rtol 0.02 --atol 0.01   the same, with printed numbers compared within
                                                      |new - old| <= atol + rtol |old| (what CI runs: printed floats
                                                      differ in their last digits between CPUs and thread counts)
    python scripts/run_notebooks.py --check --no-compare   the same, failing only when a cell raises

`--check` compares the text a cell prints or returns (images are not compared): the words exactly (runs of spaces
count as one, so a column that widens by a digit still matches), the numbers exactly or within the tolerances. A cell whose output cannot repeat
(timings, machine counters, a short run under IN_TEST that prints other numbers than the full one) says so with a
first line `# output varies: <why>`; its output is not compared. Each notebook's wall time is printed.
"""
import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NBS = ROOT / "nbs"
VARIES = "# output varies"
NUMBER = re.compile(r"(?<![\w.])[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?(?![\w.])")  # a number standing alone, not in a name


def _text(outputs: list) -> str:
    "The text of a cell's outputs: what it printed and returned, without images or execution counts."
    parts = []
    for o in outputs:
        if o.get("output_type") == "stream": parts.append("".join(o.get("text", "")))
        elif o.get("output_type") in ("execute_result", "display_data"):
            data = o.get("data", {})
            if "text/plain" in data and not any(k.startswith("image/") for k in data): parts.append("".join(data["text/plain"]))
        elif o.get("output_type") == "error": parts.append(f"{o.get('ename')}: {o.get('evalue')}")
    return "".join(parts)


def execute(path: Path, in_test: bool, timeout: int):
    "Run the notebook at `path` in a fresh python3 kernel started in nbs/; returns the executed notebook."
    import nbformat
    from nbclient import NotebookClient
    nb = nbformat.read(path, as_version=4)
    env_before = os.environ.get("IN_TEST")
    if in_test: os.environ["IN_TEST"] = "1"  # the kernel inherits the environment, as under nbdev_test
    else: os.environ.pop("IN_TEST", None)
    try:
        NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(NBS)}}).execute()
    finally:
        if env_before is None: os.environ.pop("IN_TEST", None)
        else: os.environ["IN_TEST"] = env_before
    return nb


def same_text(old: str, new: str, rtol: float = 0.0, atol: float = 0.0) -> bool:
    "Whether two outputs say the same: equal words (spacing aside) and numbers within atol + rtol x |old|."
    if old == new: return True
    words = lambda t: [" ".join(w.split()) for w in NUMBER.split(t)]
    if words(old) != words(new): return False
    return all(abs(float(y) - float(x)) <= atol + rtol * abs(float(x)) for x, y in zip(NUMBER.findall(old), NUMBER.findall(new)))


def differences(committed, executed, rtol: float = 0.0, atol: float = 0.0) -> list[str]:
    "Cells whose text output changed beyond the tolerances, as short descriptions (cells marked `# output varies` are skipped)."
    out = []
    for i, (a, b) in enumerate(zip(committed.cells, executed.cells)):
        if a.cell_type != "code" or a.source.lstrip().startswith(VARIES): continue
        old, new = _text(a.get("outputs", [])), _text(b.get("outputs", []))
        if not same_text(old, new, rtol, atol):
            first = next((f"{x!r} -> {y!r}" for x, y in zip(old.splitlines() + [""] * 99, new.splitlines() + [""] * 99) if x != y), "")
            out.append(f"cell {i} ({a.get('id', '?')}): {first[:300]}")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("notebooks", nargs="*", help="notebooks to run (default: every nbs/*.ipynb)")
    p.add_argument("--check", action="store_true", help="run under IN_TEST and compare text outputs; write nothing")
    p.add_argument("--no-compare", action="store_true", help="with --check: fail only on errors, do not compare outputs")
    p.add_argument("--rtol", type=float, default=0.0, help="with --check: relative tolerance of printed numbers (default 0: exact)")
    p.add_argument("--atol", type=float, default=0.0, help="with --check: absolute tolerance of printed numbers (default 0)")
    p.add_argument("--timeout", type=int, default=1800, help="seconds a cell may run (default 1800)")
    args = p.parse_args(argv)
    import nbformat
    paths = [Path(n).resolve() for n in args.notebooks] or sorted(NBS.glob("*.ipynb"))
    failed = []
    for path in paths:
        t0 = time.perf_counter()
        try:
            executed = execute(path, in_test=args.check, timeout=args.timeout)
        except Exception as e:  # a cell raised: nbclient names it
            print(f"{path.name}: FAILED after {time.perf_counter() - t0:.0f} s: {str(e).strip().splitlines()[-1][:500]}", flush=True)
            failed.append(path.name); continue
        took = time.perf_counter() - t0
        if args.check and args.no_compare:
            print(f"{path.name}: ran in {took:.0f} s in a real kernel", flush=True)
        elif args.check:
            diffs = differences(nbformat.read(path, as_version=4), executed, args.rtol, args.atol)
            print(f"{path.name}: ran in {took:.0f} s" + (f", {len(diffs)} cell(s) differ from the committed outputs:" if diffs else ", outputs match"), flush=True)
            for d in diffs: print("  " + d)
            if diffs: failed.append(path.name)
        else:
            nbformat.write(executed, path)
            print(f"{path.name}: ran in {took:.0f} s, outputs written", flush=True)
    if not args.check and paths:
        subprocess.run(["nbdev_clean", "--fname", *map(str, paths)] if len(paths) == 1 else ["nbdev_clean"], check=True, cwd=ROOT)
    if failed: print(f"run_notebooks: {len(failed)} notebook(s) failed: {', '.join(failed)}"); return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
