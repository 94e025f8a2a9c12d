#!/usr/bin/env python
"""Layering: an exported module may import (at top level or inside a function) only modules whose notebooks come
before its own in the notebook order (the file names of nbs/*.ipynb sort in that order). Prints each violation as
`module -> imported module (line)`; exits 1 if there is any."""
import ast, re, sys
from pathlib import Path

def notebook_order(nbs:Path)->dict:
    "module name -> sort key of the notebook that exports it (`#| default_exp name`)."
    order = {}
    for nb in sorted(nbs.glob('*.py')):
        m = re.search(r'^#\|\s*default_exp\s+(\S+)', nb.read_text(), re.M)
        if m: order[m.group(1)] = nb.stem
    return order

def violations(root:Path, lib:str='dermnb')->list:
    "Upward imports in the exported package: (module, imported, line)."
    order, out = notebook_order(root/'nbs'), []
    for py in sorted((root/lib).glob('*.py')):
        mod = py.stem
        if mod not in order: continue
        for node in ast.walk(ast.parse(py.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.level == 1:              # nbdev writes relative imports
                names = [node.module.split('.')[0]] if node.module else [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                if node.module == lib: names = [a.name for a in node.names]          # from dermnb import metrics
                elif node.module.startswith(lib + '.'): names = [node.module.split('.')[1]]
            elif isinstance(node, ast.Import):
                names = [a.name.split('.')[1] for a in node.names if a.name.startswith(lib + '.')]
            for n in names:
                if n in order and n != mod and order[n] > order[mod]: out.append((mod, n, node.lineno))
    return out

if __name__ == '__main__':
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[1]
    bad = violations(root)
    for m, n, line in bad: print(f'layering: dermnb.{m} (line {line}) imports dermnb.{n}, whose notebook comes later')
    if not bad: print('check_layers: every module imports only earlier notebooks')
    sys.exit(1 if bad else 0)
