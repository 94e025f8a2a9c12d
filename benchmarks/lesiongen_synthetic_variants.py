"""Which synthetic pool suits LesionGen's classifier arms? LoRA steps, generation guidance and confidence filtering, chosen on *validation*.

For each run (LoRA steps : guidance g) and seed, the rich LoRA (the figure's config, or the same with more steps) generates the figure's class-balanced pool (same prompts and noise as
`nbs/figures/lesiongen.ipynb`), and every arm is fitted as `classifier_arms` fits it (C and the synthetic weight
chosen on the real ISIC 2019 validation split). Two selection variants are added: `mix-filtered` / `added-filtered`
keep the synthetic images that a classifier fitted on the arm's own real images finds most typical of their prompted
class (class-balanced, the most confident first). Prints validation and test balanced accuracy per arm (mean, std
over seeds); test is reported for the record, the choice is made on validation. Pools are kept in `--pool-dir`.

    DERMNB_DATA=../shared/dermdata python benchmarks/lesiongen_synthetic_variants.py [--runs 600:4 600:2 1200:4 600:6 600:8] [--pool-dir DIR]
"""
import argparse, time
from pathlib import Path
import numpy as np, pandas as pd
from dermnb.core import data_root, cache_root
from dermnb.data import get_split
from dermnb.base import generate
from dermnb.lesiongen import (CLASSES, CLASS_GROUPS, CaptionConfig, caption_dataset, record_features, lite0_features, class_prompts,
                              fit_linear_head, fit_arm_head, _balacc, lesiongen_train_config, lesiongen_dataset, lora_rows)
from dermnb.training import train_cached, load_trained
from _results import save_results

ap = argparse.ArgumentParser()
ap.add_argument('--runs', nargs='+', default=['600:4', '600:2', '1200:4', '600:6', '600:8'], help='LoRA steps:guidance pairs')
ap.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
ap.add_argument('--n', type=int, default=600)
ap.add_argument('--pool-dir', default=None)
a = ap.parse_args()
root = data_root(); n = a.n
pool_dir = Path(a.pool_dir or cache_root()/'bench-lesiongen-pools'); pool_dir.mkdir(parents=True, exist_ok=True)
rows = caption_dataset(CaptionConfig(), root, 'cpu', progress=False)

def lora(steps):
    "The rich LoRA with `steps` optimizer steps (the figure's at LORA_STEPS), trained and cached by config."
    cfg = lesiongen_train_config('quick', 'rich').replace(steps=steps)
    return load_trained(train_cached(cfg, lambda: lesiongen_dataset(lora_rows(rows), 'rich', cfg.image_size, root), device='cpu', progress=False), 'cpu')
sp = {k: [r for r in get_split('isic2019', k, root) if CLASS_GROUPS.get(r.diagnosis)] for k in ('train', 'val', 'test')}
X = {k: record_features(v).numpy() for k, v in sp.items()}
Y = {k: np.array([CLASSES.index(CLASS_GROUPS[r.diagnosis]) for r in v]) for k, v in sp.items()}

def fit_best(Xa, ya, isy, s):
    "As classifier_arms: C (and the synthetic weight of a mixed arm) with the best validation balanced accuracy."
    return fit_arm_head(Xa, ya, np.zeros(len(ya), bool) if isy is None else isy > 0, (X['val'], Y['val']), s, syn_weights=(1., .5, .25, .1))

def filtered(rX, ry, sX, sy, k, s):
    "k synthetic indices, class-balanced, most confidently their prompted class for a classifier of the real images."
    P = fit_linear_head(rX, ry, s, 0.01).predict_proba(sX)[np.arange(len(sX)), sy]
    order = {c: np.where(sy == c)[0][np.argsort(-P[sy == c])] for c in range(len(CLASSES))}
    take, j = [], 0
    while len(take) < k:
        take += [order[c][j] for c in order if j < len(order[c])][:k - len(take)]; j += 1
    return np.array(take)

res = []
for run in a.runs:
    steps, g = int(run.split(':')[0]), float(run.split(':')[1]); bb = None
    for s in a.seeds:
        t0 = time.time(); f = pool_dir/f'syn_steps{steps}_g{g}_s{s}.npz'
        pr = class_prompts(rows, n // len(CLASSES) + 1, 'rich', seed=s)
        prompts = [p for c in CLASSES for p in pr[c]]; sy = np.array([i for i, c in enumerate(CLASSES) for _ in pr[c]])
        if not f.exists():
            bb = bb or lora(steps)
            np.savez(f, X=lite0_features(generate(bb, prompts, g, 20, seed=1000 * s)).numpy())
        sX = np.load(f)['X']
        rng = np.random.default_rng(s); ri = rng.permutation(len(X['train'])); si = rng.permutation(len(sX))
        rX, ry = X['train'][ri[:n]], Y['train'][ri[:n]]
        arms = {'real-only': (rX, ry, None), 'synthetic-only': (sX[si[:n]], sy[si[:n]], None)}
        for name, nreal, sel in (('real + synthetic', n // 2, si[:n - n // 2]),
                                 ('real + synthetic, filtered', n // 2, filtered(rX[:n // 2], ry[:n // 2], sX, sy, n - n // 2, s)),
                                 ('real + synthetic (added)', n, si[:n]),
                                 ('real + synthetic (added), filtered', n, filtered(rX, ry, sX, sy, n // 2, s))):
            arms[name] = (np.r_[rX[:nreal], sX[sel]], np.r_[ry[:nreal], sy[sel]], np.r_[np.zeros(nreal), np.ones(len(sel))])
        for arm, (Xa, ya, isy) in arms.items():
            m, C, w = fit_best(Xa, ya, isy, s)
            res.append({'lora_steps': steps, 'guidance': g, 'seed': s, 'arm': arm, 'n_train': len(ya), 'val_balanced_accuracy': _balacc(Y['val'], m.predict(X['val'])),
                        'test_balanced_accuracy': _balacc(Y['test'], m.predict(X['test'])), 'C': C, 'syn_weight': w})
        print(f'steps {steps} guidance {g} seed {s}: {time.time() - t0:.0f} s', flush=True)
df = pd.DataFrame(res)
print(df.groupby(['lora_steps', 'guidance', 'arm'], sort=False)[['val_balanced_accuracy', 'test_balanced_accuracy']].agg(['mean', 'std']).round(4).to_string())
save_results(df, 'lesiongen_synthetic_variants')
