"""The package as a user meets it: importable in a fresh interpreter, README in step with index.ipynb."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_import_in_fresh_interpreter():
    code = "import relicv2, relicv2.config, relicv2.cli; print(relicv2.__version__)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", timeout=120)
    assert r.returncode == 0, r.stderr
    version = [l for l in (ROOT / "settings.ini").read_text().splitlines() if l.startswith("version")][0]
    assert r.stdout.strip() == version.split("=")[1].strip()


def test_readme_matches_index_notebook():
    sys.path.insert(0, str(ROOT / "scripts"))
    import make_readme
    assert (ROOT / "README.md").read_text(encoding="utf-8") == make_readme.render(ROOT / "nbs" / "index.ipynb"), \
        "README.md drifted from nbs/index.ipynb: run `python scripts/make_readme.py`"


def test_readme_claims_table_is_the_generated_one():
    # the claims table is computed from experiments/claims.yaml and the committed results, never typed (12a_claims)
    from relicv2.claims import claims_markdown, claims_table
    table = claims_markdown(claims_table(ROOT))
    assert table.count("\n") >= 10 and table in (ROOT / "README.md").read_text(encoding="utf-8"), \
        "the README's claims table is not the one relicv2.claims computes: run the index notebook and make_readme"


def test_every_block_was_registered_and_committed_before_its_first_run():
    # what makes a block confirmatory, read from git and the runs' own records (12a_claims, programme)
    from relicv2.claims import programme
    for r in programme(ROOT):
        assert r["registered_first"] is not False, f"block {r['block']}: a run began before its registration was committed"
        assert r["committed"] <= r["jobs"] and (r["verdicts"] is False or r["committed"] == r["jobs"]), r["block"]


def test_every_claim_read_from_a_block_is_one_of_its_registered_comparisons():
    # a claim row names (A, B, split, metric); a block written after the row must register exactly that comparison,
    # or the row would read another metric's verdict (or none) once the block has run
    from relicv2.ablate import load_spec
    from relicv2.files import read_file
    checked = 0
    for claim in read_file(ROOT / "experiments" / "claims.yaml")["claims"]:
        for t in claim["tests"]:
            spec_path = ROOT / "experiments" / "blocks" / f"{t.get('block')}.yaml"
            if "block" not in t or not spec_path.exists(): continue  # a planned block: nothing registered yet
            confirm = load_spec(spec_path).confirm
            registered = {(c["a"], c["b"], c["split"], c.get("metric", confirm.get("metric", "linear_top1")))
                          for c in confirm["comparisons"]}
            assert (*t["comparison"], t.get("metric", "linear_top1")) in registered, (t["experiment"], sorted(registered))
            checked += 1
    assert checked >= 1 or not list((ROOT / "experiments" / "blocks").glob("*.yaml"))


def test_index_maps_every_notebook():
    index = "".join(c for cell in json.loads((ROOT / "nbs" / "index.ipynb").read_text())["cells"] for c in cell["source"])
    missing = [p.name for p in sorted((ROOT / "nbs").glob("[0-9]*.ipynb")) if f"`{p.name}`" not in index]
    assert not missing, f"notebooks missing from the map in nbs/index.ipynb: {missing}"


def test_readme_states_the_two_commands_ci_runs():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    venv = "python3 -m venv .venv && . .venv/bin/activate && "
    assert venv + "pip install -e . && relicv2-train" in readme
    assert venv + 'pip install -e ".[dev]" && nbdev_test && pytest' in readme
    steps = ["python3 -m venv .venv", ". .venv/bin/activate", 'pip install -q -e ".[dev]"', "\nnbdev_test", "\npytest"]
    at = [ci.find(step) for step in steps]
    assert -1 not in at and at == sorted(at), list(zip(steps, at))  # every step, in the README's order
    # a machine without an NVIDIA GPU: the README's CPU form, met before anything is installed, and what CI does there
    cpu = "--extra-index-url https://download.pytorch.org/whl/cpu"
    assert venv + f"pip install -e . {cpu} && relicv2-train" in readme
    assert readme.index(cpu) < readme.index('pip install -e ".[dev]"')
    assert "cpu_index=https://download.pytorch.org/whl/cpu" in ci and 'torch_index=(--extra-index-url "$cpu_index")' in ci
    assert "if ! nvidia-smi -L" in ci and 'pip install -q -e ".[dev]" "${torch_index[@]}"' in ci
    assert "\npytest -q -rs" in ci  # the CI log gives the reason of every skipped test


def test_console_scripts_resolve_and_answer_help():
    import configparser, importlib, shutil
    cfg = configparser.ConfigParser(); cfg.read(ROOT / "settings.ini")
    entries = dict(e.split("=") for e in cfg["DEFAULT"]["console_scripts"].split())
    assert {"relicv2-train", "relicv2-eval", "relicv2-ablate", "relicv2-saliency"} <= set(entries), entries
    for name, target in entries.items():
        module, func = target.split(":")
        assert callable(getattr(importlib.import_module(module), func)), target
        exe = shutil.which(name)  # installed by `pip install -e .`
        if exe is None: continue
        r = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and f"usage: {name}" in r.stdout, (name, r.stderr[-500:])


def test_notebook_output_check_catches_changes_and_skips_marked_cells():
    import nbformat
    sys.path.insert(0, str(ROOT / "scripts"))
    import run_notebooks

    def nb(*cells):
        book = nbformat.v4.new_notebook()
        for src, text in cells:
            c = nbformat.v4.new_code_cell(src); c.outputs = [nbformat.v4.new_output("stream", name="stdout", text=text)]
            book.cells.append(c)
        return book
    committed = nb(("print(1)", "1\n"), ("# output varies: a timing\nprint(t)", "3 s\n"), ("print(2)", "2\n"))
    same = nb(("print(1)", "1\n"), ("# output varies: a timing\nprint(t)", "4 s\n"), ("print(2)", "2\n"))
    stale = nb(("print(1)", "1\n"), ("# output varies: a timing\nprint(t)", "3 s\n"), ("print(2)", "two\n"))
    assert run_notebooks.differences(committed, same) == []
    diffs = run_notebooks.differences(committed, stale)
    assert len(diffs) == 1 and diffs[0].startswith("cell 2") and "'2' -> 'two'" in diffs[0], diffs


def test_notebook_output_check_compares_numbers_within_its_tolerances():
    sys.path.insert(0, str(ROOT / "scripts"))
    from run_notebooks import same_text
    table = "             test\nraw pixels    9.5   13.80\ntrained      88.0   89.70\n"
    wider = "             test\nraw pixels   10.1   13.80\ntrained      88.0   89.71\n"  # a column one digit wider
    assert not same_text(table, wider)  # exact by default
    assert same_text(table, wider, rtol=0.07) and not same_text(table, wider, rtol=0.05)  # 9.5 -> 10.1 is 6.3%
    assert same_text("loss 0.5000", "loss 0.5004", atol=1e-3) and not same_text("loss 0.5000", "loss 0.5004", atol=1e-4)
    assert not same_text("lr 0.01282", "lr 0.0641", rtol=0.02)  # a stale output is still caught
    assert not same_text("final loss 1.0", "final loss nan", rtol=1)  # a word in place of a number
    assert not same_text("step 3 of 4", "step 3 of 4 (done)", rtol=1)  # more words
    assert not same_text("resnet18 x0.25", "resnet50 x0.25", rtol=1)  # digits inside a name are words


def test_results_notebook_keeps_its_outputs_small():
    # a lesson, not a lab log: its figures are 64-colour PNGs (small_png in the notebook) and its outputs stay small
    nb = json.loads((ROOT / "nbs" / "12_results.ipynb").read_text(encoding="utf-8"))
    size = sum(len(json.dumps(c.get("outputs", []))) for c in nb["cells"] if c["cell_type"] == "code")
    assert size < 200_000, f"12_results stores {size} bytes of outputs (limit 200000)"


def _choice_tuples() -> dict:
    "The choice lists of relicv2.config: its upper-case tuples of two or more strings, by name."
    from relicv2 import config
    return {k: v for k, v in vars(config).items()
            if k.isupper() and isinstance(v, tuple) and len(v) > 1 and all(isinstance(x, str) for x in v)}


def test_each_config_literal_is_made_from_its_choice_tuple():
    import ast
    import typing
    from relicv2 import config
    choices, seen = _choice_tuples(), 0
    for cls in ast.walk(ast.parse(Path(config.__file__).read_text())):
        if not isinstance(cls, ast.ClassDef): continue
        hints = typing.get_type_hints(getattr(config, cls.name))
        for node in cls.body:
            ann = getattr(node, "annotation", None)
            if not (isinstance(ann, ast.Subscript) and isinstance(ann.value, ast.Name) and ann.value.id == "Literal"): continue
            where = f"{cls.name}.{node.target.id}"
            assert isinstance(ann.slice, ast.Name) and ann.slice.id in choices, f"{where}: write Literal[TUPLE] with a tuple of relicv2.config"
            assert typing.get_args(hints[node.target.id]) == choices[ann.slice.id], where
            seen += 1
    assert seen >= 11  # mask_fill, arch, padding, shortcut, objective, kl_direction, kl_construction, optimizer, precision...


def test_no_module_declares_a_choice_list_of_the_config_again():
    """A tuple, list or set of string literals (a Literal[...] included) with the values of one of the config's choice
    lists, anywhere in relicv2/ but config.py, is a second declaration: import the config's tuple instead."""
    import ast
    by_values = {frozenset(v): k for k, v in _choice_tuples().items()}
    found = []
    for path in sorted((ROOT / "relicv2").glob("*.py")):
        if path.name in ("config.py", "_modidx.py"): continue
        for node in ast.walk(ast.parse(path.read_text())):
            elts = getattr(node, "elts", None) if isinstance(node, (ast.Tuple, ast.List, ast.Set)) else None
            if elts and all(isinstance(e, ast.Constant) and isinstance(e.value, str) for e in elts):
                name = by_values.get(frozenset(e.value for e in elts))
                if name: found.append(f"{path.name}:{node.lineno} declares {name} again")
    assert not found, found
    assert len(by_values) >= 14  # the scan looks for every choice list, not only some


def test_every_literal_of_the_package_is_made_from_a_tuple():
    "A `Literal` spelled with its values beside a tuple of the same values drifts: each is written Literal[TUPLE]."
    import ast
    found = []
    for path in sorted((ROOT / "relicv2").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Subscript) and getattr(node.value, "id", getattr(node.value, "attr", None)) == "Literal"
                    and not isinstance(node.slice, (ast.Name, ast.Attribute))):
                found.append(f"{path.name}:{node.lineno}")
    assert not found, found
def test_every_module_imports_in_a_fresh_interpreter():
    # each module of the package imports (the graph test below makes the order irrelevant: no module needs another first)
    mods = sorted(p.stem for p in (ROOT / "relicv2").glob("*.py") if not p.stem.startswith("_"))
    code = "import importlib, sys\nfor m in sys.argv[1:]: importlib.import_module('relicv2.' + m)"
    r = subprocess.run([sys.executable, "-c", code, *mods], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]


def test_import_graph_has_no_circle_and_no_arrow_running_up():
    # every import of a relicv2 module, at the top of a file or inside a function, runs down to a lower floor
    sys.path.insert(0, str(ROOT / "scripts"))
    import layers
    g = layers.import_graph(ROOT / "relicv2")
    assert "items" in g and g["items"] == {}, g.get("items")  # the ground floor of the datasets imports nothing of ours
    assert layers.sccs(g) == [], layers.sccs(g)
    assert layers.upward(g) == [], layers.upward(g)
    # the datasets build on relicv2.items, never on the registry; the evaluation modules share the probes' features
    for m in ("readers", "synthetic", "spurious", "deepusps"): assert "data" not in g[m], (m, g[m])
    assert "evaluate" not in g["official_eval"] and "official_eval" not in g["probes"], (g["official_eval"], g["probes"])
