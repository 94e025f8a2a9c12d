# %% [markdown]
# # Figure runner
#
# > Runs the paper-figure notebooks with papermill, writes their outputs to `figures/<name>/`, and keeps an index.

# %%
#| default_exp runner

# %%
#| export
from __future__ import annotations
import os, sys, json, time, subprocess, shutil, tempfile, datetime
from pathlib import Path
from typing import Sequence
import pandas as pd
from dermnb.core import DermnbError, atomic_write, atomic_save, save_figure, save_json, get_profile

# %%
from fastcore.test import test_eq, test_fail, test_close
import matplotlib; matplotlib.use('Agg')


# %% [markdown]
# ## Figure outputs with provenance
#
# A figure notebook stays thin: it takes its parameters, calls `dermnb`, and hands figures and tables to a
# `FigureOut`. Every CSV it writes carries the profile, data root and seed it came from, so a number in a table can
# always be traced to the run that measured it.

# %%
#| export
class FigureOut:
    "Writes one figure notebook's PNGs and CSVs (with provenance columns) into its output folder."
    def __init__(self, out_dir:str|Path, # figures/<name>/
                 profile:str, # run profile
                 data_root:str|Path|None, # data root used
                 seed:int, # seed used
                 **extra # more provenance (device, ...)
                ):
        self.dir = Path(out_dir); self.dir.mkdir(parents=True, exist_ok=True)
        self.prov = {'profile': profile, 'data_root': str(data_root or os.environ.get('DERMNB_DATA', '')), 'seed': seed, **extra}

    def png(self, fig, name:str)->Path:
        "Save a matplotlib figure as `<name>.png`."
        return save_figure(fig, self.dir/f'{name}.png')

    def csv(self, df:pd.DataFrame, name:str)->Path:
        "Save a table as `<name>.csv`, with provenance columns appended."
        df = df.copy()
        for k, v in self.prov.items(): df[k] = v
        return atomic_save(self.dir/f'{name}.csv', lambda t: df.to_csv(t, index=False))


# %%
import matplotlib.pyplot as plt
with tempfile.TemporaryDirectory() as d:
    fo = FigureOut(d, 'quick', '/data', 3)
    fo.csv(pd.DataFrame({'dice': [.5]}), 't'); fig, ax = plt.subplots(); fo.png(fig, 'p')
    t = pd.read_csv(Path(d)/'t.csv')
    test_eq(t.columns.tolist(), ['dice', 'profile', 'data_root', 'seed']); test_eq(t.seed[0], 3)
    assert (Path(d)/'p.png').exists()

# %% [markdown]
# ## Finding the figure notebooks
#
# Figure notebooks live in `nbs/figures/`; names starting with `_` are scratch. They run in the order of
# `FIGURE_ORDER` (the order the story is told in), then any others alphabetically.

# %%
#| export
FIGURE_ORDER = ['data_overview', 'metrics_sanity', 'backbone', 'diffseg', 'cpde', 'lesiongen', 'skindualgen']

def project_root()->Path:
    "The repository root (the folder holding settings.ini), for an editable install or a checkout."
    here = [Path(__file__).resolve().parents[1]] if '__file__' in globals() else []   # the package's checkout
    for p in [Path.cwd(), *Path.cwd().parents, *here]:
        if (p/'settings.ini').exists() and (p/'nbs').is_dir(): return p
    raise DermnbError("Cannot find the dermnb project (settings.ini + nbs/); run from the repository")

def figure_notebooks(nbs_dir:str|Path|None=None # folder of figure notebooks; default nbs/figures
                    )->dict:
    "Map figure name -> notebook path, in presentation order."
    d = Path(nbs_dir) if nbs_dir else project_root()/'nbs'/'figures'
    found = {p.stem: p for p in d.glob('*.ipynb') if not p.name.startswith(('_', '.'))}
    order = [n for n in FIGURE_ORDER if n in found] + sorted(set(found) - set(FIGURE_ORDER))
    return {n: found[n] for n in order}


# %%
figs = figure_notebooks()
test_eq(list(figs)[0], 'data_overview')

# %% [markdown]
# ## Running one figure
#
# papermill injects the parameters (`profile`, `data_root`, `seed`, `device`, `out_dir`) and executes the notebook.
# A failure is reported with the notebook and the cell that failed, and does not stop the other figures. The executed
# notebook is kept next to the outputs; one over 1 MB is renamed `_executed_<name>.ipynb`, which git ignores.

# %%
#| export
MAX_NOTEBOOK_BYTES = 1_000_000

def git_commit(root:Path|None=None)->str:
    "Short commit of the project, with '-dirty' when tracked files have uncommitted changes."
    root = root or project_root()
    try:
        c = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(['git', 'status', '--porcelain', '--untracked-files=no', '--', '.', ':!figures'],
                               cwd=root, capture_output=True, text=True).stdout.strip()
        return c + ('-dirty' if dirty else '')
    except (subprocess.CalledProcessError, FileNotFoundError): return 'unknown'

def _failed_cell(nb_path:Path)->str:
    "Describe the first cell of an executed notebook whose output is an error."
    import nbformat
    try: nb = nbformat.read(nb_path, as_version=4)
    except Exception: return 'unknown cell'
    papermill_tags = {'injected-parameters', 'papermill-error-cell-tag'}
    cells = [c for c in nb.cells if not papermill_tags & set(c.metadata.get('tags', []))]   # numbering of the source notebook
    for i, c in enumerate(cells):
        for o in c.get('outputs', []):
            if o.get('output_type') == 'error':
                first = c.source.strip().splitlines()[:1]
                return f"cell {i} ({first[0][:60] if first else ''!r}): {o.get('ename')}: {str(o.get('evalue'))[:300]}"
    return 'unknown cell'

def run_figure(name:str, # figure name (notebook stem)
               nb_path:Path, # the figure notebook
               out_root:str|Path='figures', # outputs go to out_root/name
               profile:str='quick', # run profile
               data_root:str|None=None, # data root passed to the notebook
               seed:int=0, # seed passed to the notebook
               device:str='auto', # device passed to the notebook
               progress:bool=True # show papermill's per-cell progress bar
              )->dict:
    "Execute one figure notebook with papermill; return its index entry (status, runtime, error)."
    import papermill as pm
    get_profile(profile)
    out = Path(out_root)/name; out.mkdir(parents=True, exist_ok=True)
    params = dict(profile=profile, data_root=str(data_root) if data_root else None, seed=seed, device=device, out_dir=str(out))
    fd, tmp = tempfile.mkstemp(suffix='.ipynb', dir=out, prefix='.running_'); os.close(fd)
    t0, err = time.time(), None
    try:
        pm.execute_notebook(str(nb_path), tmp, parameters=params, kernel_name='python3', progress_bar=progress,
                            cwd=str(project_root()), log_output=False)
    except Exception as e:
        err = f"{nb_path.name} failed at {_failed_cell(Path(tmp))}" if Path(tmp).exists() else f"{nb_path.name}: {e}"
    runtime = time.time() - t0
    big = Path(tmp).exists() and Path(tmp).stat().st_size > MAX_NOTEBOOK_BYTES
    for stale in (out/f'{name}.ipynb', out/f'_executed_{name}.ipynb'): stale.unlink(missing_ok=True)
    if Path(tmp).exists(): os.chmod(tmp, 0o644); os.replace(tmp, out/(f'_executed_{name}.ipynb' if big else f'{name}.ipynb'))
    return {'name': name, 'status': 'failed' if err else 'ok', 'profile': profile, 'seed': seed, 'device': device,
            'runtime_s': round(runtime, 1), 'commit': git_commit(), 'error': err,
            'finished': datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC'),
            'outputs': sorted(p.name for p in out.iterdir() if p.suffix in ('.png', '.csv'))}


# %% [markdown]
# ## The index
#
# `figures/README.md` lists every figure with its profile, runtime, commit and outputs. The entries live in
# `figures/index.json`, so running one figure updates its row and keeps the others.

# %%
#| export
def write_index(entries:Sequence[dict], # entries from run_figure
                out_root:str|Path='figures', # the figures folder
                known:Sequence[str]|None=None # figures that still exist; older entries of others are dropped
               )->Path:
    "Merge entries into figures/index.json and regenerate figures/README.md."
    out_root = Path(out_root); idx = out_root/'index.json'
    old = {e['name']: e for e in json.loads(idx.read_text())} if idx.exists() else {}
    old.update({e['name']: e for e in entries})
    if known is not None: old = {k: v for k, v in old.items() if k in set(known)}
    order = FIGURE_ORDER + sorted(set(old) - set(FIGURE_ORDER))
    rows = [old[n] for n in order if n in old]
    save_json(rows, idx)
    lines = ['# Figures', '', 'Made by `make figures` (`dermnb figures`); each folder holds the PNGs, the CSVs (with the profile,',
             'data root and seed they came from) and the executed notebook.', '',
             '| figure | status | profile | runtime | commit | finished | outputs |', '|---|---|---|---|---|---|---|']
    for e in rows:
        outs = ', '.join(f'[{o}]({e["name"]}/{o})' for o in e['outputs'] if o.endswith('.png')) or '-'
        lines.append(f"| [{e['name']}]({e['name']}/) | {e['status']} | {e['profile']} | {e['runtime_s']:.0f} s | "
                     f"`{e['commit']}` | {e['finished']} | {outs} |")
    errs = [e for e in rows if e.get('error')]
    if errs: lines += ['', '## Failures', ''] + [f"- **{e['name']}**: {e['error']}" for e in errs]
    with atomic_write(out_root/'README.md', 'w') as f: f.write('\n'.join(lines) + '\n')
    return out_root/'README.md'


# %%
with tempfile.TemporaryDirectory() as d:
    e = dict(name='x', status='ok', profile='quick', seed=0, device='cpu', runtime_s=1.0, commit='abc', error=None,
             finished='now', outputs=['a.png', 'b.csv'])
    write_index([e], d); write_index([{**e, 'name': 'data_overview'}], d)
    md = (Path(d)/'README.md').read_text()
    assert '[a.png](x/a.png)' in md and md.index('data_overview') < md.index('| [x]')   # both kept, in order
    test_eq(len(json.loads((Path(d)/'index.json').read_text())), 2)
    write_index([e], d, known=['x'])                                   # data_overview's notebook is gone: dropped
    test_eq([r['name'] for r in json.loads((Path(d)/'index.json').read_text())], ['x'])
    assert 'data_overview' not in (Path(d)/'README.md').read_text()


# %% [markdown]
# ## Running several
#
# `run_figures` runs the requested figures (all by default), prints progress, updates the index after each one, and
# returns the entries; the CLI turns any failure into a non-zero exit that names the notebook and the cell.

# %%
#| export
def run_figures(names:Sequence[str]|None=None, # figure names; None = all
                profile:str='quick', # run profile
                out_root:str|Path='figures', # output folder
                data_root:str|None=None, # data root; default $DERMNB_DATA
                seed:int=0, # seed
                device:str='auto', # device
                nbs_dir:str|Path|None=None, # folder of figure notebooks
                progress:bool=True # per-cell progress bars
               )->list:
    "Run figure notebooks in order, keeping going after failures; returns their index entries."
    figs = figure_notebooks(nbs_dir)
    names = list(names or figs)
    unknown = [n for n in names if n not in figs]
    if unknown: raise DermnbError(f"Unknown figure(s) {unknown}; available: {list(figs)}")
    data_root = str(Path(data_root or os.environ.get('DERMNB_DATA', '')).resolve()) if (data_root or os.environ.get('DERMNB_DATA')) else None
    entries = []
    for i, n in enumerate(names, 1):
        print(f"[{i}/{len(names)}] {n} ({profile}) ...", flush=True)
        e = run_figure(n, figs[n], out_root, profile, data_root, seed, device, progress)
        print(f"[{i}/{len(names)}] {n}: {e['status']} in {e['runtime_s']:.0f} s" + (f" -- {e['error']}" if e['error'] else ''), flush=True)
        entries.append(e); write_index([e], out_root, known=list(figs))
    return entries


# %% [markdown]
# The runner on a throw-away figure folder: one notebook that works and one that fails in its second cell.

# %%
import nbformat
from nbformat.v4 import new_notebook, new_code_cell
with tempfile.TemporaryDirectory() as d:
    d = Path(d); (d/'nbs').mkdir()
    par = new_code_cell("profile = 'quick'\ndata_root = None\nseed = 0\ndevice = 'auto'\nout_dir = 'x'"); par.metadata['tags'] = ['parameters']
    ok = new_notebook(cells=[par, new_code_cell("from dermnb.runner import FigureOut\nimport pandas as pd\n"
                                                "FigureOut(out_dir, profile, data_root, seed).csv(pd.DataFrame({'v':[seed]}), 'v')")])
    bad = new_notebook(cells=[par, new_code_cell("1/0")])
    for n, nb in (('good', ok), ('broken', bad)):
        nb.metadata['kernelspec'] = {'name': 'python3', 'display_name': 'Python 3', 'language': 'python'}
        nbformat.write(nb, d/'nbs'/f'{n}.ipynb')
    res = run_figures(['good', 'broken'], seed=7, out_root=d/'out', nbs_dir=d/'nbs', progress=False)
    test_eq([r['status'] for r in res], ['ok', 'failed'])
    assert 'broken.ipynb failed at cell 1' in res[1]['error'] and 'ZeroDivisionError' in res[1]['error']
    test_eq(pd.read_csv(d/'out'/'good'/'v.csv').v[0], 7)          # the parameter reached the notebook
    assert (d/'out'/'good'/'good.ipynb').exists() and 'broken' in (d/'out'/'README.md').read_text()
