"""Draw the package's import graph: modules, arrows, circles and floors (`python scripts/layers.py`)."""
import ast, sys
from pathlib import Path

PKG = 'relicv2'
ROOT = Path(__file__).resolve().parent.parent/PKG

def _targets(node, mod):
    "relicv2 modules named by one import node inside module `mod`."
    if isinstance(node, ast.Import):
        return [a.name.split('.')[1] for a in node.names if a.name.startswith(PKG+'.')]
    if isinstance(node, ast.ImportFrom):
        if node.level == 1 and node.module: return [node.module.split('.')[0]]
        if node.level == 1: return [a.name for a in node.names]
        if node.module == PKG: return [a.name for a in node.names]
        if node.module and node.module.startswith(PKG+'.'): return [node.module.split('.')[1]]
    return []

def import_graph(root=ROOT):
    "{module: {imported module: 'top'|'lazy'}} over every relicv2/*.py, top-level and function-level imports."
    mods = {p.stem for p in root.glob('*.py') if not p.stem.startswith('_')}
    g = {}
    for m in sorted(mods):
        tree = ast.parse((root/f'{m}.py').read_text())
        top = {id(n) for n in tree.body}
        edges = {}
        for node in ast.walk(tree):
            for t in _targets(node, m):
                if t in mods and t != m:
                    kind = 'top' if id(node) in top else 'lazy'
                    if edges.get(t) != 'top': edges[t] = kind
        g[m] = edges
    return g

def sccs(g):
    "Strongly connected components of `g` with more than one module (Tarjan)."
    index, low, stack, on, out, i = {}, {}, [], set(), [], [0]
    def visit(v):
        index[v] = low[v] = i[0]; i[0] += 1; stack.append(v); on.add(v)
        for w in g[v]:
            if w not in index: visit(w); low[v] = min(low[v], low[w])
            elif w in on: low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop(); on.discard(w); comp.append(w)
                if w == v: break
            if len(comp) > 1: out.append(sorted(comp))
    sys.setrecursionlimit(10000)
    for v in g:
        if v not in index: visit(v)
    return out

def floors(g):
    "{module: floor}: 0 for modules importing nothing from the package, else 1 + highest floor imported (circles collapsed)."
    comp = {m: m for m in g}
    for c in sccs(g):
        for m in c: comp[m] = c[0]
    memo = {}
    def f(m, seen=()):
        c = comp[m]
        if c in memo: return memo[c]
        members = [x for x in g if comp[x] == c]
        deps = {comp[t] for x in members for t in g[x]} - {c}
        memo[c] = 0 if not deps else 1 + max(f(d) for d in deps)
        return memo[c]
    return {m: f(m) for m in g}

def upward(g):
    "Arrows that run up or sideways: m imports t although t's floor is not below m's."
    fl = floors(g)
    return [(m, t, k) for m in g for t, k in g[m].items() if fl[t] >= fl[m]]

if __name__ == '__main__':
    g = import_graph()
    fl = floors(g)
    n_edges = sum(len(v) for v in g.values())
    cs = sccs(g)
    print(f'{len(g)} modules, {n_edges} arrows ({sum(k=="lazy" for v in g.values() for k in v.values())} lazy), '
          f'{max(fl.values())+1} floors')
    print(f'circles: {len(cs)}, modules in circles: {sum(map(len, cs))}')
    for c in cs: print('  circle:', ' '.join(c))
    up = upward(g)
    print(f'arrows not running down: {len(up)}')
    for m, t, k in up: print(f'  {m} -> {t} ({k}, floor {fl[m]} -> {fl[t]})')
    if '-v' in sys.argv:
        for f in range(max(fl.values())+1):
            for m in sorted(x for x in g if fl[x] == f):
                deps = ', '.join(f'{t}{"*" if k=="lazy" else ""}' for t, k in sorted(g[m].items()))
                print(f'{f:2d} {m:18s} <- {deps}')
