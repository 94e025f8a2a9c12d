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
from dataclasses import dataclass
from typing import Callable, Sequence
import pandas as pd
from dermnb.core import (DermnbError, atomic_write, atomic_save, save_figure, save_json, get_profile, project_root,
                         seed_everything, data_root as resolve_data_root)

# %%
from fastcore.test import test_eq, test_fail, test_close
import matplotlib; matplotlib.use('Agg')


# %% [markdown]
# ## Figure outputs with provenance
#
# A figure notebook stays thin: it takes its parameters, calls `dermnb`, and hands figures and tables to a
# `FigureOut`. Every CSV it writes carries the profile, data root and seed it came from, so a number in a table can
# always be traced to the run that measured it. A table that has a column of the same name (the seed of each
# classifier arm, say) keeps it, and the run's value goes to `run_<name>`: an earlier version overwrote the arms' seeds
# with the figure's.

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
        self.profile, self.seed, self.device = get_profile(profile), seed, extra.get('device', 'auto')
        self.root = Path(data_root) if data_root else None
        self.prov = {'profile': profile, 'data_root': str(data_root or os.environ.get('DERMNB_DATA', '')), 'seed': seed, **extra}

    @property
    def quick(self)->bool:
        "Whether this run uses the quick profile (small models trained here) rather than pretrained ones."
        return not self.profile.pretrained

    def png(self, fig, name:str)->Path:
        "Save a matplotlib figure as `<name>.png`."
        return save_figure(fig, self.dir/f'{name}.png')

    def csv(self, df:pd.DataFrame, name:str)->Path:
        "Save a table as `<name>.csv`, with provenance columns appended (`run_<key>` where the table has that column)."
        df = df.copy()
        for k, v in self.prov.items(): df[f'run_{k}' if k in df.columns else k] = v   # never overwrite a measured column
        return atomic_save(self.dir/f'{name}.csv', lambda t: df.to_csv(t, index=False))


# %%
import matplotlib.pyplot as plt
with tempfile.TemporaryDirectory() as d:
    fo = FigureOut(d, 'quick', '/data', 3)
    fo.csv(pd.DataFrame({'dice': [.5]}), 't'); fig, ax = plt.subplots(); fo.png(fig, 'p')
    t = pd.read_csv(Path(d)/'t.csv')
    test_eq(t.columns.tolist(), ['dice', 'profile', 'data_root', 'seed']); test_eq(t.seed[0], 3)
    fo.csv(pd.DataFrame({'seed': [0, 1], 'dice': [.5, .6]}), 'arms')      # a per-seed table keeps its own seeds
    t = pd.read_csv(Path(d)/'arms.csv'); test_eq(t.seed.tolist(), [0, 1]); test_eq(t.run_seed.tolist(), [3, 3])
    assert (Path(d)/'p.png').exists()


# %% [markdown]
# Every figure notebook starts the same way: seed everything, resolve the data root, make its `FigureOut`, and set the
# plotting theme. `figure_setup` does it in one call, so the notebooks keep only what is theirs.

# %%
#| export
def figure_setup(profile:str, # run profile ('quick' or 'full')
                 data_root:str|Path|None, # data root; None = $DERMNB_DATA
                 seed:int, # seed of the run
                 device:str, # 'auto', 'cpu' or 'cuda'
                 out_dir:str|Path # figures/<name>/
                )->FigureOut:
    "Seed, resolve the data root and theme for a figure notebook; returns its `FigureOut` (with `.root`, `.profile`...)."
    import seaborn as sns
    seed_everything(seed)
    sns.set_theme(style='whitegrid', context='notebook')
    return FigureOut(out_dir, profile, resolve_data_root(data_root), seed, device=device)


# %%
with tempfile.TemporaryDirectory() as d:
    fo = figure_setup('quick', None, 1, 'cpu', Path(d)/'fig')
    assert fo.quick and fo.root.is_dir() and fo.dir.is_dir(); test_eq((fo.seed, fo.device, fo.profile.name), (1, 'cpu', 'quick'))
    test_fail(lambda: figure_setup('quick', '/no/data', 0, 'cpu', d), contains='/no/data')

# %% [markdown]
# ## Finding the figure notebooks
#
# Figure notebooks live in `nbs/figures/`; names starting with `_` are scratch. They run in the order of
# `FIGURE_ORDER` (the order the story is told in), then any others alphabetically.

# %%
#| export
FIGURE_ORDER = ['data_overview', 'metrics_sanity', 'backbone', 'diffseg', 'lesiongen', 'cpde', 'skindualgen']


# %%
#| export
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
# ## What was measured, against the papers
#
# The README's results table is generated, never typed: each row is a claim of a paper (or of this project), the
# paper's number or wording, and ours, read from the committed figure CSVs with the data and n it was measured on.
# A method whose figure has not been run (or not been built) says so. `CLAIMS` lists the rows; each knows which CSV
# answers it.

# %%
#| export
@dataclass
class Claim:
    "One row of the results table: a paper's claim and how to read our number for it from a figure's CSVs."
    method:str      # method or component, e.g. 'DiffSeg'
    claim:str       # what the paper (or dermnb) claims
    paper:str       # the paper's number or wording
    figure:str      # the figure folder under figures/ that measures it
    ours:Callable   # figure folder -> (our result as text, data and n as text); may raise FileNotFoundError


# %%
#| export
def _csv(d:Path, name:str)->pd.DataFrame:
    p = Path(d)/f'{name}.csv'
    if not p.is_file(): raise FileNotFoundError(p)
    return pd.read_csv(p)

def _diffseg_dice(d, dataset):
    t = _csv(d, 'comparison'); t = t[t.dataset == dataset].set_index('method')
    if t.empty: raise FileNotFoundError(f"{d}/comparison.csv has no rows for {dataset}")
    get = lambda m: f"{t.loc[m, 'dice']:.3f}" if m in t.index else 'n/a'
    rows = [m for m in ('DiffSeg + CRF', 'DiffSeg translation + CRF', 'diffseg-distilled', 'colour baseline', 'Otsu', 'U-Net (supervised)') if m in t.index]
    return ', '.join(f"{m} {get(m)}" for m in rows), f"{dataset}, n = {int(t['n'].iloc[0])}"

def _diffseg_unc(d):
    c = _csv(d, 'uncertainty_correlation')
    name = lambda r: f"{r.method}, {r.dataset}" if 'method' in c else r.dataset
    return '; '.join(f"{name(r)}: ρ = {r.spearman_rho:.2f}" for r in c.itertuples()), ', '.join(f"n = {int(r.n)}" for r in c.itertuples())

def _backbone_fid(d):
    t = _csv(d, 'fid_kid_vs_time'); real = t[t.model.str.startswith('real')].iloc[0]
    lat = t[t.model.str.startswith('latent')].sort_values('step').iloc[-1]; pix = t[t.model == 'pixel'].sort_values('step').iloc[-1]
    return (f"latent {lat.fid:.1f} at {lat.minutes:.1f} min vs pixel {pix.fid:.1f} at {pix.minutes:.1f} min "
            f"(real-vs-real floor {real.fid:.1f})", f"ISIC 2018+2019 test, 64 px, n = {int(lat.n)}")

def _dermclip(d):
    t = _csv(d, 'dermclip_table').set_index('model')
    a, b = t.loc['DermCLIP (trained)'], t.loc['chance']
    return (f"ISIC 2019 balanced acc {a.isic2019_bal_acc:.3f} (chance {b.isic2019_bal_acc:.3f}), PH2 mel-vs-nev "
            f"{a.ph2_mel_nev_bal_acc:.3f}", f"ISIC 2019 test n = {int(a.n_isic2019)}, PH2 test n = {int(a.n_ph2)}")

def _lesiongen_arms(d):
    t = _csv(d, 'classifier_summary').set_index('arm')
    f = lambda a, c: f"{t.loc[a, c + ' mean']:.3f} ± {t.loc[a, c + ' std']:.3f}"
    ratio = t.loc['synthetic-only', 'balanced_accuracy mean'] / t.loc['real-only', 'balanced_accuracy mean']
    return (f"balanced acc: real {f('real-only', 'balanced_accuracy')}, synthetic {f('synthetic-only', 'balanced_accuracy')} "
            f"({ratio:.1%} of real), real+syn (equal count) {f('real + synthetic', 'balanced_accuracy')}, real+syn (added, 2n) "
            f"{f('real + synthetic (added)', 'balanced_accuracy')}"
            + (f", the real half alone {f('real-only (half)', 'balanced_accuracy')}" if 'real-only (half)' in t.index else '')
            + f"; worst subgroup: real {f('real-only', 'worst subgroup')}, "
            f"real+syn {f('real + synthetic', 'worst subgroup')}, added {f('real + synthetic (added)', 'worst subgroup')}",
            f"ISIC 2019 test, n = {int(t['n_test'].iloc[0])}; {int(t['n_train'].iloc[0])} training images per arm, {int(t['seeds'].iloc[0])} seeds")

def _lesiongen_faith(d):
    f = _csv(d, 'concept_faithfulness'); g = f.groupby('captions')[['prompted_rate', 'unprompted_rate']].mean()
    fid = _csv(d, 'fid_per_class').groupby('captions').fid.mean()
    lift = ''
    if 'lift' in f:                                         # tables written before the paired design have no lift
        from dermnb.lesiongen import faithfulness_summary
        fs = faithfulness_summary(f); l, se = fs.lift, fs.lift_se
        lift = f"; lift over the same noise unprompted: rich {l['rich']:+.3f} ± {se['rich']:.3f} vs label-only {l['label']:+.3f} ± {se['label']:.3f}"
    return (f"concept detection when prompted: rich {g.loc['rich', 'prompted_rate']:.2f} vs label-only {g.loc['label', 'prompted_rate']:.2f} "
            f"(unprompted {g.loc['rich', 'unprompted_rate']:.2f} / {g.loc['label', 'unprompted_rate']:.2f}){lift}; mean FID per class rich "
            f"{fid['rich']:.1f} vs label-only {fid['label']:.1f}", f"{int(f.m.iloc[0])} images per concept; FID n per class in fid_per_class.csv")

def _skindualgen(d):
    c = _csv(d, 'consistency').set_index('model'); g = _csv(d, 'augmentation_segmentation_gain')
    if 'arm' not in g: g = g.assign(arm='real + synthetic')             # tables written before the filtered arm
    g = g.set_index(['arm', 'fraction']); k = _csv(d, 'augmentation_classification_gain').set_index('fraction'); f10 = min(k.index)
    judge = (f", the judge on real images {c.loc['real test images (ground truth)', 'dice_mean']:.3f}"
             if 'real test images (ground truth)' in c.index else '')
    gains = ', '.join(f"{a} {g.loc[(a, f10), 'mean']:+.3f} ± {g.loc[(a, f10), 'std']:.3f} (min {g.loc[(a, f10), 'min']:+.3f})"
                      for a in g.index.get_level_values(0).unique() if (a, f10) in g.index)
    return (f"consistency Dice {c.loc['with shape loss', 'dice_mean']:.3f} (without the shape loss "
            f"{c.loc['without shape loss', 'dice_mean']:.3f}{judge}); at {f10:.0%} real data: U-Net Dice gain "
            f"{gains}; classifier accuracy gain {k.loc[f10, 'accuracy mean']:+.3f} ± "
            f"{k.loc[f10, 'accuracy std']:.3f}, macro F1 {k.loc[f10, 'macro_f1 mean']:+.3f}",
            f"ISIC 2018 test; {int(c['n'].iloc[0])} pairs per model; 3 seeds per arm")

def _cpde(d):
    t = _csv(d, 'comparison').set_index('method'); a, c = t.loc['Asyrp'], t.loc['CPDE']
    o = _csv(d, 'orderings').set_index('claim') if (Path(d)/'orderings.csv').is_file() else pd.DataFrame()
    sd = o.loc['CPDE beats Asyrp on S_dir'] if 'paired_diff' in o and 'CPDE beats Asyrp on S_dir' in o.index else None
    paired = f" (paired difference {sd.paired_diff:+.3f} ± {sd.paired_se:.3f} SE)" if sd is not None else ''
    return (f"FID {c.fid:.1f} vs Asyrp {a.fid:.1f}, S_dir {c.s_dir:.3f} vs {a.s_dir:.3f}{paired}, NS-LPIPS {c.ns_lpips:.3f} vs "
            f"{a.ns_lpips:.3f}; segmentation consistency Dice {c.seg_dice:.3f}; 'add' detection {c.add_detected_before:.2f} → "
            f"{c.add_detected_after:.2f}", f"PH2 + Derm7pt test, n = {int(c.n)} edits per method; masks: {c.masks}; FID vs the unedited originals")


# %%
#| export
CLAIMS = [
    Claim('DiffSeg', 'weakly supervised DiffSeg (+ CRF) beats U-Net-based segmentation', 'beats U-Net baselines on ISIC 2018',
          'diffseg', lambda d: _diffseg_dice(d, 'ISIC 2018 test')),
    Claim('DiffSeg', 'the same on an external set', '(not reported)', 'diffseg', lambda d: _diffseg_dice(d, 'PH2 (external)')),
    Claim('DiffSeg', 'output diversity (GED) indicates error', 'uncertainty maps flag errors', 'diffseg', _diffseg_unc),
    Claim('backbone', 'a latent space pays on a CPU (FID at equal training time)', '(dermnb design choice)', 'backbone', _backbone_fid),
    Claim('DermCLIP', 'an in-domain CLIP trained here reads diagnoses zero-shot', '(dermnb component)', 'metrics_sanity', _dermclip),
    Claim('LesionGen', 'classifiers trained on synthetic images approach real ones; real + synthetic helps',
          '(no public numbers; our targets: synthetic ≥ 80% of real, real+syn ≥ real)', 'lesiongen', _lesiongen_arms),
    Claim('LesionGen', 'concept-rich captions beat label-only captions', 'better concept faithfulness and FID (ablation)', 'lesiongen', _lesiongen_faith),
    Claim('CPDE', 'CPDE beats Asyrp on FID, S_dir and NS-LPIPS', 'FID 0.274 vs 0.482, S_dir 0.486 vs 0.452, NS-LPIPS 0.012 vs 0.151',
          'cpde', _cpde),
    Claim('SkinDualGen', 'synthetic image+mask pairs improve classifiers and segmenters', '+8% to +15% accuracy/F1, better Dice/IoU',
          'skindualgen', _skindualgen),
]


# %%
#| export
def results_table(figures_dir:str|Path='figures' # the figures folder (committed outputs)
                 )->pd.DataFrame:
    "One row per claim in `CLAIMS`: the paper's number and ours, read from the figure CSVs, with the data and n."
    rows = []
    for c in CLAIMS:
        try: ours, data = c.ours(Path(figures_dir)/c.figure)
        except FileNotFoundError: ours, data = f'figure `{c.figure}` not run yet', ''
        rows.append({'method': c.method, 'claim': c.claim, 'paper': c.paper, 'ours': ours, 'data, n': data,
                     'source': f'figures/{c.figure}/'})
    return pd.DataFrame(rows)


# %%
#| export
def results_markdown(figures_dir:str|Path='figures', # the figures folder
                     link_prefix:str='figures/' # how the table links the figure folders (README: 'figures/', figures/README.md: '')
                    )->str:
    "The results table as Markdown, with links to the figure folders."
    t = results_table(figures_dir)
    lines = ['| method | claim | paper | ours | data, n |', '|---|---|---|---|---|']
    for r in t.itertuples():
        lines.append(f"| [{r.method}]({link_prefix}{r.source[len('figures/'):]}) | {r.claim} | {r.paper} | {r.ours} | {r._5} |")
    return '\n'.join(lines)


# %%
with tempfile.TemporaryDirectory() as d:
    d = Path(d); (d/'diffseg').mkdir()
    pd.DataFrame({'dataset': ['ISIC 2018 test'] * 3, 'method': ['DiffSeg + CRF', 'Otsu', 'U-Net (supervised)'],
                  'dice': [.5, .7, .9], 'n': [200] * 3}).to_csv(d/'diffseg'/'comparison.csv', index=False)
    t = results_table(d).set_index('claim')
    test_eq(t.iloc[0].ours, 'DiffSeg + CRF 0.500, Otsu 0.700, U-Net (supervised) 0.900'); test_eq(t.iloc[0]['data, n'], 'ISIC 2018 test, n = 200')
    assert t.iloc[3].ours.startswith('figure `backbone` not run yet') and t.loc['CPDE beats Asyrp on FID, S_dir and NS-LPIPS'].ours.startswith('figure `cpde` not run yet')
    (d/'cpde').mkdir()
    pd.DataFrame({'method': ['Asyrp', 'CPDE'], 'fid': [20., 10.], 's_dir': [.1, .2], 'ns_lpips': [.3, .01], 'seg_dice': [.8, .95], 'n': [40, 40],
                  'add_detected_before': [.1, .1], 'add_detected_after': [.2, .4], 'masks': ['ground truth'] * 2}).to_csv(d/'cpde'/'comparison.csv', index=False)
    cp = results_table(d).set_index('claim').loc['CPDE beats Asyrp on FID, S_dir and NS-LPIPS']
    assert cp.ours.startswith('FID 10.0 vs Asyrp 20.0') and '0.10 → 0.40' in cp.ours and 'n = 40' in cp['data, n']
    pd.DataFrame({'claim': ['CPDE beats Asyrp on S_dir'], 'holds': [True], 'paired_diff': [.1], 'paired_se': [.02]}).to_csv(d/'cpde'/'orderings.csv', index=False)
    cp = results_table(d).set_index('claim').loc['CPDE beats Asyrp on FID, S_dir and NS-LPIPS']
    assert 'S_dir 0.200 vs 0.100 (paired difference +0.100 ± 0.020 SE)' in cp.ours, cp.ours
    md = results_markdown(d); assert md.startswith('| method |') and '[DiffSeg](figures/diffseg/)' in md
    (d/'skindualgen').mkdir(); sd = d/'skindualgen'
    pd.DataFrame({'model': ['with shape loss', 'without shape loss', 'real test images (ground truth)'], 'dice_mean': [.81, .8, .92],
                  'n': [126, 126, 128]}).to_csv(sd/'consistency.csv', index=False)
    pd.DataFrame({'arm': ['real + synthetic (filtered)', 'real + synthetic (filtered)', 'real + synthetic'], 'fraction': [.1, 1., .1],
                  'mean': [.01, 0., -.01], 'std': [.02, .01, .01], 'min': [.001, -.01, -.02]}).to_csv(sd/'augmentation_segmentation_gain.csv', index=False)
    pd.DataFrame({'fraction': [.1, 1.], 'accuracy mean': [.03, 0.], 'accuracy std': [.01, .01], 'macro_f1 mean': [.02, 0.]}).to_csv(sd/'augmentation_classification_gain.csv', index=False)
    sg = results_table(d).set_index('method').loc['SkinDualGen']
    assert sg.ours.startswith('consistency Dice 0.810 (without the shape loss 0.800, the judge on real images 0.920)')
    assert 'real + synthetic (filtered) +0.010 ± 0.020 (min +0.001), real + synthetic -0.010 ± 0.010' in sg.ours and 'accuracy gain +0.030' in sg.ours
print(results_markdown(project_root()/'figures'))


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
    lines += ['', '## Results against the papers', '', 'Generated from the CSVs in these folders (the same table is in the '
              "project's README).", '', results_markdown(out_root, link_prefix='')]
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
