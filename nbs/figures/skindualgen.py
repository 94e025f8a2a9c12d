# %% [markdown]
# # SkinDualGen: an image and its lesion mask from one prompt, and what the pairs buy
#
# One latent diffusion model (the shared base, widened by mask latent channels, LoRA-adapted) generates an image and
# its mask in a single pass from LesionGen's concept-rich prompts. Measured here: image–mask consistency (the project's
# U-Net on the generated image against the generated mask), FID/KID per class, the mask-shape loss ablation, and the
# paper's claim, augmentation of a segmenter and a classifier at 10%, 25% and 100% of the real training data with
# the same budget per arm over 3 seeds. The mechanism is ours (no code is public): see `nbs/09_skindualgen.ipynb`.

# %% tags=["parameters"]
profile = 'quick'
data_root = None
seed = 0
device = 'auto'
out_dir = 'figures/skindualgen'

# %%
import time, json
import numpy as np, pandas as pd, seaborn as sns, matplotlib.pyplot as plt, torch
from dermnb.core import image_grid, load_image
from dermnb.data import get_split, DermDataset
from dermnb.base import fid_kid
from dermnb.metrics import inception_features
from dermnb.segmenter import load_segmenter, SegmenterConfig
from dermnb.lesiongen import CaptionConfig, caption_dataset, lite0_features, record_features, fit_linear_head, lesiongen_prompt
from dermnb.skindualgen import (load_skindualgen, skindualgen_train_config, generate_pairs, consistency, mask_flag, AugSegConfig,
                                aug_seg_arm, select_synthetic, write_pairs, SHAPE_DEFAULTS)
from dermnb.runner import figure_setup
out = figure_setup(profile, data_root, seed, device, out_dir)
root = out.root
S = {'quick': dict(n_cons=128, n_fid=64, fractions=(0.1, 0.25, 1.0), seeds=(0, 1, 2), seg_steps=200, n_syn=400, n_cls_syn=300),
     'full': dict(n_cons=1000, n_fid=500, fractions=(0.1, 0.25, 1.0), seeds=(0, 1, 2), seg_steps=3000, n_syn=2000, n_cls_syn=2000)}[out.profile.name]
times, t0 = [], time.time()
def lap(what):
    global t0
    times.append({'step': what, 'seconds': round(time.time() - t0, 1)}); t0 = time.time()


# %% [markdown]
# ## The models: with the mask-shape loss, and the ablation without it

# %%
rows = caption_dataset(CaptionConfig(), root, device)
models = {'with shape loss': load_skindualgen(profile, SHAPE_DEFAULTS['shape'], root, device), 'without shape loss': load_skindualgen(profile, 0., root, device)}
runs = pd.DataFrame([{'model': k, **{c: json.loads((m.cache_dir/'train_state.json').read_text())[c] for c in ('step', 'train_s', 'prep_s', 'images_per_s', 'final_loss')},
                      'loss': skindualgen_train_config(profile, SHAPE_DEFAULTS['shape'] if k == 'with shape loss' else 0.).loss} for k, m in models.items()])
out.csv(runs, 'training_runs'); lap('training'); runs

# %% [markdown]
# ## Generated pairs per class
#
# Prompts: LesionGen captions of held-out ISIC 2018 images (their diagnosis, concepts and size), so the prompts follow
# the real distribution of each class.

# %%
test_rows = caption_dataset(CaptionConfig(datasets=('isic2018_task1',), splits=('test',)), root, device)
dx_of = lambda r: {'melanoma': 'melanoma', 'nevus': 'nevus', 'benign_keratosis': 'seborrheic keratosis'}.get(r['diagnosis'])
by_class = {c: [r['caption'] for r in test_rows if dx_of(r) == c] for c in ('melanoma', 'nevus', 'seborrheic keratosis')}
g = 2.
show = [p for c in by_class for p in by_class[c][:6]]
ims, ms = generate_pairs(models['with shape loss'], show, g, 20, seed)
out.png(image_grid(list(ims), titles=[c for c in by_class for _ in range(6)], preds=list(ms.numpy()), ncols=6, size=1.7,
                   suptitle='SkinDualGen: generated image with its generated mask (red), one row per class'), 'pairs_per_class')
write_pairs(ims, ms, out.dir/'examples', show)   # a readable folder of pairs (SYN_*.jpg + SYN_*_segmentation.png)
lap('examples')

# %% [markdown]
# ## Image–mask consistency (U-Net on the generated image vs the generated mask), and the ablation
#
# Beside the generated pairs, the same U-Net scores real test images against their ground truth at the same 64 px:
# the ceiling this judge allows. `consistency_by_size.csv` splits both by lesion area and keeps the mean area of the
# mask and of the U-Net's reading, so a size disagreement shows apart from a shape one.

# %%
unet = load_segmenter(SegmenterConfig.for_profile(profile), root, device)
cons_prompts = [p for c in by_class for p in (by_class[c] * 10)[:S['n_cons'] // 3]]
cons = []
for k, m in models.items():
    i, mk = generate_pairs(m, cons_prompts, g, 20, seed + 1)
    cons.append(consistency(i, mk, unet).assign(model=k))
cons = pd.concat(cons, ignore_index=True)
# the judge's ceiling: the same U-Net on real test images, squashed to the same size, against their ground truth
real_ref = DermDataset(list(get_split('isic2018_task1', 'test', root))[:S['n_cons']], 64, 'squash', in_memory=True)
ref = consistency(torch.stack([real_ref[k]['image'] for k in range(len(real_ref))]),
                  torch.stack([real_ref[k]['mask'][0] > .5 for k in range(len(real_ref))]), unet).assign(model='real test images (ground truth)')
out.csv(pd.concat([cons, ref], ignore_index=True), 'consistency_per_pair')
csum = pd.concat([cons, ref]).groupby('model', sort=False).agg(
    dice_mean=('dice', 'mean'), dice_median=('dice', 'median'), mask_fraction=('lesion_fraction', 'mean'), unet_fraction=('unet_fraction', 'mean'),
    n=('dice', 'size'), empty=('flag', lambda f: int((f == 'empty').sum())), full=('flag', lambda f: int((f == 'full').sum()))).reset_index()
out.csv(csum, 'consistency')
sized = pd.concat([cons, ref], ignore_index=True).assign(size=lambda t: pd.cut(t.lesion_fraction, [0, .1, .2, .4, 1.],
                                                         labels=['< 10%', '10-20%', '20-40%', '> 40%']))
by_size = sized.groupby(['model', 'size'], observed=True).agg(dice_mean=('dice', 'mean'), mask_fraction=('lesion_fraction', 'mean'),
                                                              unet_fraction=('unet_fraction', 'mean'), n=('dice', 'size')).reset_index()
out.csv(by_size, 'consistency_by_size')
fig, ax = plt.subplots(figsize=(6, 3.2))
sns.histplot(pd.concat([cons, ref], ignore_index=True), x='dice', hue='model', bins=20, element='step', stat='density', common_norm=False, ax=ax)
ax.set_title(f"U-Net Dice vs the generated mask (real images: vs ground truth); n = {len(cons) // len(models)} pairs per model, {len(ref)} real", fontsize=8); out.png(fig, 'consistency_hist')
lap('consistency'); by_size.round(3)

# %% [markdown]
# ## FID / KID per class against real ISIC 2018 test images

# %%
test_recs = {r.id: r for r in get_split('isic2018_task1', 'test', root)}
fid_rows = []
for j, (c, ps) in enumerate(by_class.items()):
    real = [test_recs[r['id']] for r in test_rows if dx_of(r) == c][:S['n_fid']]
    n = min(len(real), S['n_fid'])
    rx = DermDataset(real[:n], 64, 'squash', with_mask=False).images_uint8().float() / 255
    rf = inception_features(rx, device=device)
    i, _ = generate_pairs(models['with shape loss'], (ps * 10)[:n], g, 20, seed + 10 + j)
    fid_rows.append({'class': c, **fid_kid(rf, i, device, seed)})
fid = pd.DataFrame(fid_rows); out.csv(fid, 'fid_per_class'); lap('FID'); fid.round(3)

# %% [markdown]
# ## Segmentation augmentation: real fraction vs real + synthetic pairs, same steps per arm
#
# Each arm trains for the same steps on its real fraction, with as many synthetic pairs again where it adds them. The
# filtered arm takes the synthetic pairs its own real-only net agrees with most (`select_synthetic`); the unfiltered
# hybrid runs at the smallest fraction, where the paper's claim is made. An arm trained for too few steps is limited by
# its steps rather than its data, and then no data, real or synthetic, can help it: the real-only curve, read against
# the fraction, shows how much ten times more real data buys at this budget, the scale any synthetic gain is read on.
# Every arm's result is cached by its config and the content of its data (`aug_seg_arm`), so a rerun with the same
# models trains nothing; `train_s` in `augmentation_segmentation.csv` is each arm's own training time.
# The pool holds `n_syn` generated pairs less the flagged ones (`pool` in the table). Where the real fraction has at least
# as many images as the pool, the filtered arm takes every pair, so at those fractions it is the unfiltered hybrid.

# %%
train_pairs = DermDataset([r for r in get_split('isic2018_task1', 'train', root)], 64, 'squash', in_memory=True)
test_pairs = DermDataset(list(test_recs.values()), 64, 'squash', in_memory=True)
train_rows = [r for r in rows if r['source'] == 'isic2018_task1']
syn_prompts = [train_rows[k]['caption'] for k in np.random.default_rng(seed).integers(len(train_rows), size=S['n_syn'])]
syn_i, syn_m = generate_pairs(models['with shape loss'], syn_prompts, g, 20, seed + 100)
keep = torch.tensor([mask_flag(m) == '' for m in syn_m.numpy()])          # flagged pairs are not used
syn_i, syn_m = syn_i[keep], syn_m[keep]
seg = []
for f in S['fractions']:
    n_real = int(round(f * len(train_pairs))); n_syn = min(n_real, len(syn_i))
    for s in S['seeds']:
        cfg = lambda n=0: AugSegConfig(steps=S['seg_steps'], fraction=f, synthetic=n, seed=s)
        arms = {'real only': aug_seg_arm(cfg(), train_pairs, test_pairs, pool=(syn_i, syn_m))}   # its agreement picks the pairs
        sel = select_synthetic(arms['real only']['agreement'], n_syn)
        arms['real + synthetic (filtered)'] = aug_seg_arm(cfg(n_syn), train_pairs, test_pairs, syn_i[sel], syn_m[sel])
        if f == min(S['fractions']):                                         # the unfiltered hybrid, at the smallest fraction
            arms['real + synthetic'] = aug_seg_arm(cfg(n_syn), train_pairs, test_pairs, syn_i, syn_m)
        for arm, r in arms.items():
            seg.append({'fraction': f, 'seed': s, 'arm': arm, 'n_real': n_real, 'n_synthetic': 0 if arm == 'real only' else n_syn, 'pool': len(syn_i),
                        'agreement_kept': float(arms['real only']['agreement'][sel].mean()) if 'filtered' in arm else np.nan,
                        'dice': r['dice'], 'iou': r['iou'], 'train_s': r['train_s']})
seg = pd.DataFrame(seg); out.csv(seg, 'augmentation_segmentation')
gain = seg.pivot_table(index=['fraction', 'seed'], columns='arm', values='dice')
gain = pd.concat([(gain[a] - gain['real only']).dropna().rename('gain').reset_index().assign(arm=a) for a in gain.columns if a != 'real only'])
gsum = gain.groupby(['arm', 'fraction']).gain.agg(['mean', 'std', 'min', 'max']).reset_index(); out.csv(gsum, 'augmentation_segmentation_gain')
lap('segmentation augmentation'); gsum.round(4)

# %% [markdown]
# ## Classification augmentation: melanoma / nevus / seborrheic keratosis
#
# Each seed draws its own real subset and its own class-balanced synthetic images (from a pool of twice as many), so
# the spread covers the synthetic draw too; at 100% the real set is the same for every seed and only that draw varies.

# %%
lab = {'melanoma': 0, 'nevus': 1, 'benign_keratosis': 2}
tr = [r for r in get_split('isic2018_task1', 'train', root) if r.diagnosis in lab]
te = [r for r in get_split('isic2018_task1', 'test', root) if r.diagnosis in lab]
Xtr, Xte = record_features(tr).numpy(), record_features(te).numpy()
ytr, yte = np.array([lab[r.diagnosis] for r in tr]), np.array([lab[r.diagnosis] for r in te])
cls_prompts = {c: [r['caption'] for r in train_rows if r['diagnosis'] == d] for d, c in
               (('melanoma', 0), ('nevus', 1), ('benign_keratosis', 2))}
per = S['n_cls_syn'] // 3
cp = [p for c in range(3) for p in (cls_prompts[c] * 50)[:2 * per]]; cy_pool = np.repeat(np.arange(3), 2 * per)
ci, _ = generate_pairs(models['with shape loss'], cp, g, 20, seed + 200)
cX_pool = lite0_features(ci).numpy()
from sklearn.metrics import f1_score
cls = []
for f in S['fractions']:
    for s in S['seeds']:
        idx = np.random.default_rng(s).permutation(len(tr))[:int(round(f * len(tr)))]
        pick = np.concatenate([np.random.default_rng(1000 + s).choice(np.flatnonzero(cy_pool == c), per, replace=False) for c in range(3)])
        cX, cy = cX_pool[pick], cy_pool[pick]          # each seed its own synthetic draw (per class) from a pool of twice as many
        for arm, (X, y) in (('real only', (Xtr[idx], ytr[idx])), ('real + synthetic', (np.concatenate([Xtr[idx], cX]), np.concatenate([ytr[idx], cy])))):
            p = fit_linear_head(X, y, s).predict(Xte)
            bal = np.mean([(p[yte == c] == c).mean() for c in range(3)])
            cls.append({'fraction': f, 'seed': s, 'arm': arm, 'n_real': len(idx), 'n_synthetic': len(y) - len(idx), 'accuracy': float((p == yte).mean()),
                        'balanced_accuracy': float(bal), 'macro_f1': float(f1_score(yte, p, average='macro'))})
cls = pd.DataFrame(cls); out.csv(cls, 'augmentation_classification')
cg = cls.pivot_table(index=['fraction', 'seed'], columns='arm', values=['accuracy', 'balanced_accuracy', 'macro_f1'])
cgain = pd.DataFrame({m: cg[m]['real + synthetic'] - cg[m]['real only'] for m in ('accuracy', 'balanced_accuracy', 'macro_f1')})
cgsum = cgain.groupby('fraction').agg(['mean', 'std']); cgsum.columns = [' '.join(c) for c in cgsum.columns]
out.csv(cgsum.reset_index(), 'augmentation_classification_gain'); lap('classification augmentation')

fig, axs = plt.subplots(1, 3, figsize=(13, 3.3))
sns.lineplot(seg, x='fraction', y='dice', hue='arm', marker='o', errorbar='sd', ax=axs[0]); axs[0].set_title(f'U-Net Dice, ISIC 2018 test (n={len(test_pairs)})')
sns.lineplot(cls, x='fraction', y='balanced_accuracy', hue='arm', marker='o', errorbar='sd', ax=axs[1]); axs[1].set_title(f'classifier balanced accuracy (n={len(te)})')
sns.lineplot(cls, x='fraction', y='macro_f1', hue='arm', marker='o', errorbar='sd', ax=axs[2]); axs[2].set_title('classifier macro F1')
for a in axs: a.set_xscale('log'); a.set_xlabel('fraction of the real training data')
out.png(fig, 'augmentation_curves')
out.csv(pd.DataFrame(times), 'timings'); cgsum.round(4)
