#!/usr/bin/env python
"""Fail when notebooks, their py:percent pairs, the exported package, cleaned metadata or README disagree.
Works on a scratch copy, so it never touches the working tree."""
import sys, shutil, subprocess, tempfile, filecmp
from pathlib import Path
import jupytext

root = Path(__file__).resolve().parents[1]
bin_dir = Path(sys.executable).parent
problems = []

def cells(path):
    "Cell types, sources and tags: what a pair must agree on (outputs and other metadata are the notebook's own)."
    nb = jupytext.read(path)
    return [(c.cell_type, c.source.strip(), tuple(c.metadata.get('tags', ()))) for c in nb.cells]

# 1. every notebook has an up-to-date py:percent twin
for nb in sorted((root/'nbs').rglob('*.ipynb')):
    if '.ipynb_checkpoints' in nb.parts: continue
    py = nb.with_suffix('.py')
    if not py.exists(): problems.append(f'{nb.relative_to(root)} has no paired {py.name}'); continue
    if cells(nb) != cells(py): problems.append(f'{py.relative_to(root)} differs from its notebook (jupytext --sync)')

# 1b. every figure notebook has one papermill parameters cell with the runner's parameters
for nb in sorted((root/'nbs'/'figures').glob('*.ipynb')):
    params = [src for t, src, tags in cells(nb) if 'parameters' in tags]
    need = ('profile', 'data_root', 'seed', 'device', 'out_dir')
    if len(params) != 1 or not all(f'{k} =' in params[0] for k in need):
        problems.append(f'{nb.relative_to(root)} needs one cell tagged "parameters" defining {", ".join(need)}')

# 2. nbdev_export and nbdev_clean on a scratch copy must change nothing
with tempfile.TemporaryDirectory() as d:
    d = Path(d)
    for p in ('settings.ini', 'setup.py', 'pyproject.toml', 'nbs', 'dermnb'):
        src = root/p
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, d/p)
    for cmd in ('nbdev_export', 'nbdev_clean'):
        r = subprocess.run([str(bin_dir/cmd)], cwd=d, capture_output=True, text=True)
        if r.returncode: problems.append(f'{cmd} failed: {r.stderr[-500:]}')
    for sub in ('dermnb', 'nbs'):
        for f in sorted((d/sub).rglob('*')):
            if f.is_dir() or '__pycache__' in f.parts or '.ipynb_checkpoints' in f.parts: continue
            orig = root/f.relative_to(d)
            if not orig.exists() or not filecmp.cmp(f, orig, shallow=False):
                hint = 'run nbdev_export' if sub == 'dermnb' else 'run nbdev_clean'
                problems.append(f'{f.relative_to(d)} changes under {hint} (make sync)')

# 2b. layering: modules import only the notebooks before theirs
sys.path.insert(0, str(root/'.ci'))
from check_layers import violations
problems += [f'layering: dermnb.{m} (line {l}) imports dermnb.{n}, whose notebook comes later' for m, n, l in violations(root)]

# 3. README.md is generated from nbs/index.ipynb
r = subprocess.run([sys.executable, str(root/'.ci'/'make_readme.py'), '--check'], capture_output=True, text=True)
if r.returncode: problems.append(r.stderr.strip() or 'README.md out of date')

# 3b. figures/README.md's results table is the same generated table (a figure run into another folder and copied
#     here leaves it stale: regenerate with dermnb.runner.write_index)
sys.path.insert(0, str(root))
from dermnb.runner import results_markdown
fig_readme = root/'figures'/'README.md'
if fig_readme.exists() and results_markdown(root/'figures', link_prefix='') not in fig_readme.read_text():
    problems.append('figures/README.md results table is out of date with the figure CSVs (dermnb.runner.write_index([], "figures"))')

if problems:
    print('Out of sync:\n  ' + '\n  '.join(problems)); sys.exit(1)
print('check_sync: notebooks, pairs, package and README agree')
