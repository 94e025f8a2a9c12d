# %% [markdown]
# # Metrics sanity: do the metrics measure what they claim?
#
# Checks of `dermnb.metrics` on real ISIC 2018 Task 1 images and masks: segmentation scores against the official
# ISIC scorer, FID/KID on the standard Inception under known degradations, NS-LPIPS on lesion-only and
# background-only edits, GED on hand-made sample sets, and the in-domain CLIP (DermCLIP) against its baselines on
# zero-shot diagnosis and retrieval. All numbers are computed here; nothing is typed in.

# %% tags=["parameters"]
profile = 'quick'
data_root = None
seed = 0
device = 'auto'
out_dir = 'figures/metrics_sanity'

# %%
import time
from pathlib import Path
import numpy as np, pandas as pd, seaborn as sns, matplotlib.pyplot as plt
from dermnb.core import load_image, load_mask, image_grid
from dermnb import metrics as M
from dermnb.dermclip import dermclip_table
from dermnb.runner import figure_setup
out = figure_setup(profile, data_root, seed, device, out_dir)
root = out.root
# sizes per profile; quick stays within ~3 minutes on 2 CPU cores
cfg = {'quick': dict(n_masks=20, n_fid=64, noise=(0.02, 0.05, 0.1), blur=(1.0, 2.0, 4.0), kid_subsets=50, n_edit=8),
       'full': dict(n_masks=200, n_fid=1000, noise=(0.01, 0.02, 0.05, 0.1, 0.2), blur=(0.5, 1.0, 2.0, 4.0, 8.0),
                    kid_subsets=100, n_edit=100)}[out.profile.name]
files = M.isic2018_task1_files(root)
t_start = time.time()

# %% [markdown]
# ## Segmentation metrics agree with the official ISIC 2018 scorer
#
# Real ground-truth masks spread over the id range, each scored against perturbed copies (identical, eroded, dilated,
# shifted, emptied, full) and two empty-GT cases, by `dermnb.metrics.seg_metrics` and by `isic-challenge-scoring`.

# %%
pick = files.iloc[np.linspace(0, len(files) - 1, cfg['n_masks']).round().astype(int)]
masks = {i: load_mask(p) for i, p in zip(pick.id, pick.mask_path)}
xc = M.isic_crosscheck(masks)
agreement = (xc.groupby('metric').agg(max_abs_diff=('abs_diff', 'max'), mean_dermnb=('dermnb', 'mean'), mean_isic=('isic', 'mean'),
                                      pairs=('abs_diff', 'size')).reset_index())
out.csv(xc, 'seg_crosscheck_per_image'); out.csv(agreement, 'seg_crosscheck_agreement')
out.png(M.plot_seg_crosscheck(xc), 'seg_crosscheck')
agreement

# %%
first = pick.iloc[0]; gt = masks[first.id]; pert = M.perturbed_masks(gt)
scores = {k: M.seg_metrics(v, gt) for k, v in pert.items()}
fig = image_grid([load_image(first.image_path)] * len(pert),
                 [f"{k}\nJaccard {s['jaccard']:.3f}  Dice {s['dice']:.3f}\nthr-Jaccard {s['threshold_jaccard']:.3f}" for k, s in scores.items()],
                 ncols=3, masks=[gt] * len(pert), preds=list(pert.values()), size=3.0,
                 suptitle=f'{first.id}: perturbed predictions (red) vs ground truth (green)')
out.png(fig, 'seg_perturbations')

# %% [markdown]
# ## FID and KID on the standard Inception
#
# Two disjoint random sets of real ISIC images, A (reference) and B (test). FID(A, A) must be 0. FID(A, B) is the
# real-vs-real floor at this N: positive because FID is biased upwards at small N (see `nbs/02_metrics`), so compare
# FIDs only at equal N. Degrading B with Gaussian noise or blur must raise FID and KID monotonically. KID(A, A) comes
# out slightly negative: its two random subsets of the same set share images, and the unbiased estimator drops only
# the within-subset diagonal, so shared images inflate the cross term.

# %%
perm = np.random.default_rng(seed).permutation(len(files))
set_a = list(files.image_path.iloc[perm[:cfg['n_fid']]]); set_b = list(files.image_path.iloc[perm[cfg['n_fid']:2 * cfg['n_fid']]])
feats_a = M.folder_features(set_a, device=device)
kid_aa = M.kid(feats_a, feats_a, cfg['kid_subsets'], seed=seed)
curve = M.fid_degradation_curve(set_a, set_b, {'noise': cfg['noise'], 'blur': cfg['blur']}, device=device,
                                kid_subsets=cfg['kid_subsets'], seed=seed)
monotone = curve.groupby('degradation', sort=False).fid.apply(lambda s: bool(s.is_monotonic_increasing))
fid_summary = pd.DataFrame([dict(check='FID(A, A)', value=M.fid_from_features(feats_a, feats_a)),
                            dict(check='KID(A, A) mean', value=kid_aa[0]), dict(check='KID(A, A) std', value=kid_aa[1]),
                            dict(check='FID(A, B) undegraded', value=curve.fid.iloc[0]),
                            *[dict(check=f'FID monotone in {k} level', value=float(v)) for k, v in monotone.items()]]).assign(n=cfg['n_fid'])
out.csv(curve, 'fid_kid_degradation'); out.csv(fid_summary, 'fid_kid_summary')
out.png(M.plot_degradation_curve(curve), 'fid_kid_degradation')
fid_summary

# %%
curve

# %%
img = M.as_image_batch(load_image(set_b[0]))[0]
levels = [(k, lv) for k in ('noise', 'blur') for lv in (0.0, *cfg[k])]
fig = image_grid([M.degrade([img], k, lv, seed)[0] for k, lv in levels], [f'{k} σ={lv:g}' for k, lv in levels],
                 ncols=len(levels) // 2, size=2.4, suptitle='The degradations behind the curves (one test image)')
out.png(fig, 'degradation_examples')

# %% [markdown]
# ## NS-LPIPS: edits inside the lesion leave it at 0, edits of the skin raise it
#
# Each image is tinted inside the lesion, then (separately) outside it. The distance is `effnet_lpips_uncalibrated`
# (LPIPS-style on ImageNet EfficientNet-Lite0 features, unit weights: not calibrated LPIPS numbers).
# NS-LPIPS = D(x ⊙ (1 − M), y ⊙ (1 − M)) with the lesion painted black in both images.

# %%
edit_ids = files.iloc[perm[2 * cfg['n_fid']:2 * cfg['n_fid'] + cfg['n_edit']]]
edit_imgs = [load_image(p) for p in edit_ids.image_path]; edit_masks = [load_mask(p) for p in edit_ids.mask_path]
edits = M.edit_locality_table(edit_imgs, edit_masks, ids=list(edit_ids.id), device=device)
edit_summary = edits.groupby('edit', sort=False)[['distance_whole', 'ns_lpips', 'lesion_lpips', 'l1_background', 'psnr_background',
                                                  'ssim_background', 'psnr_lesion', 'ssim_lesion']].agg(['mean', 'max'])
edit_summary.columns = [f'{a}_{b}' for a, b in edit_summary.columns]
out.csv(edits, 'ns_lpips_edits'); out.csv(edit_summary.reset_index(), 'ns_lpips_summary')
edit_summary.round(4)

# %%
long = edits.melt(id_vars=['id', 'edit'], value_vars=['distance_whole', 'ns_lpips', 'lesion_lpips'], var_name='distance', value_name='value')
g = sns.catplot(long, kind='strip', x='distance', y='value', hue='edit', dodge=True, height=3.6, aspect=1.6)
g.set_axis_labels('', 'effnet_lpips_uncalibrated'); g.figure.suptitle(f'Edit locality on {len(edit_imgs)} real ISIC images', y=1.03)
out.png(g.figure, 'ns_lpips_edits')

# %%
x = M.as_image_batch(edit_imgs[:3]); mk = np.stack(edit_masks[:3])
les, bg = M.tint_region(x, mk), M.tint_region(x, ~mk)
row = lambda i, e: edits[(edits.id == edit_ids.id.iloc[i]) & (edits.edit == e)].iloc[0]
panels = [im for i in range(3) for im in (x[i], les[i], bg[i])]
titles = [t for i in range(3) for t in (f'{edit_ids.id.iloc[i]}', f"lesion tinted\nwhole {row(i, 'lesion').distance_whole:.3f}, NS {row(i, 'lesion').ns_lpips:.3f}",
                                        f"skin tinted\nwhole {row(i, 'background').distance_whole:.3f}, NS {row(i, 'background').ns_lpips:.3f}")]
fig = image_grid(panels, titles, ncols=3, masks=[mk[i] for i in range(3) for _ in range(3)], size=2.8,
                 suptitle='NS-LPIPS ignores lesion edits and sees skin edits (lesion contour in green)')
out.png(fig, 'ns_lpips_examples')

# %% [markdown]
# ## GED on hand-made sample sets
#
# D²_GED = 2E[d(S,Y)] − E[d(S,S′)] − E[d(Y,Y′)] with d = 1 − IoU, all pairs including i = j (PHiSeg's convention).

# %%
examples = M.ged_examples(gt)
ged_table = pd.DataFrame([{'example': k, **M.ged_terms(s, r)} for k, (s, r) in examples.items()])
out.csv(ged_table, 'ged_examples')
out.png(M.plot_ged_examples(load_image(first.image_path), examples), 'ged_examples')
ged_table

# %% [markdown]
# ## DermCLIP: zero-shot diagnosis and retrieval
#
# DermCLIP (EfficientNet-Lite0 ImageNet + all-MiniLM-L6-v2 towers, trained contrastively with open_clip's `ClipLoss`
# on concept captions) against the same model before contrastive training (pretrained towers, untrained
# projections), the same architecture from random initialisation (trained with the same recipe, and untrained),
# and chance.
# Zero-shot accuracy and balanced accuracy on the ISIC 2019 and PH2 test splits; image→text and text→image
# recall@1/5 on a held-out pool of test images. Both DermCLIPs train on a cache miss (minutes on a CPU in the quick
# profile), then come from the cache.

# %%
t_clip = time.time()
table = dermclip_table(profile, root, seed, device=device)
out.csv(table, 'dermclip_table')
tcheck = table.set_index('model')
order_ok = {col: bool(tcheck.loc['DermCLIP (trained)', col] > tcheck.loc['pretrained, untuned', col]
                      and tcheck.loc['DermCLIP (trained)', col] > tcheck.loc['random towers (trained)', col])
            for col in ('isic2019_bal_acc', 'ph2_bal_acc', 'i2t_R@5', 't2i_R@5')}
print('trained DermCLIP beats both baselines on', {k: v for k, v in order_ok.items()})
table.drop(columns=['n_isic2019', 'n_ph2', 'n_retrieval']).round(3)

# %%
clip_metrics = {'isic2019_acc': 'ISIC 2019\naccuracy', 'isic2019_bal_acc': 'ISIC 2019\nbalanced acc.', 'ph2_acc': 'PH2 (3 classes)\naccuracy',
                'ph2_bal_acc': 'PH2 (3 classes)\nbalanced acc.', 'ph2_mel_nev_bal_acc': 'PH2 mel. vs nevus\nbalanced acc.',
                'i2t_R@1': 'image→text\nR@1', 'i2t_R@5': 'image→text\nR@5', 't2i_R@1': 'text→image\nR@1', 't2i_R@5': 'text→image\nR@5'}
long = table.melt(id_vars='model', value_vars=list(clip_metrics), var_name='metric', value_name='value')
long['metric'] = long.metric.map(clip_metrics)
n0 = table.iloc[0]
fig, axs = plt.subplots(1, 2, figsize=(15, 4.8), gridspec_kw={'width_ratios': [5, 4]})
palette = dict(zip(table.model, sns.color_palette('deep', len(table) - 1) + [(.6, .6, .6)]))
for ax, keys, title in ((axs[0], list(clip_metrics)[:5], f"Zero-shot diagnosis (ISIC 2019 test n={n0.n_isic2019}, PH2 test n={n0.n_ph2})"),
                        (axs[1], list(clip_metrics)[5:], f"Retrieval on {n0.n_retrieval} held-out test images")):
    sub = long[long.metric.isin([clip_metrics[k] for k in keys])]
    sns.barplot(sub, x='metric', y='value', hue='model', palette=palette, ax=ax)
    ax.set_title(title); ax.set_xlabel(''); ax.set_ylabel(''); ax.set_ylim(0, 1); ax.get_legend().remove()
    for c in ax.containers: ax.bar_label(c, fmt='%.2f', fontsize=6, padding=1)
fig.legend(*axs[0].get_legend_handles_labels(), loc='lower center', ncol=len(table), bbox_to_anchor=(.5, -.06), frameon=False)
fig.suptitle(f'DermCLIP ({profile} profile): trained vs pretrained-untuned vs random towers vs chance', y=1.02)
fig.tight_layout(); out.png(fig, 'dermclip_bars')

# %% [markdown]
# open_clip's `ClipLoss` per step (symmetric cross-entropy over the batch; at chance it is log(batch size)), smoothed
# over 20 steps, for both trained models, and where their training time went.

# %%
infos = table.attrs['train_info']
hist = pd.concat([pd.DataFrame(i['history']).assign(model=k) for k, i in infos.items()], ignore_index=True)
out.csv(hist, 'dermclip_loss')
timing = pd.DataFrame([{'model': k, 'n_train': i['n_train'], 'n_captions': i['n_captions'], 'threads': i['threads'],
                        'cpu_seconds': i['cpu_seconds'], **{f'{s}_seconds': v for s, v in i['seconds'].items()}} for k, i in infos.items()])
out.csv(timing, 'dermclip_timing')
fig, ax = plt.subplots(figsize=(8, 3.2))
sm = hist.assign(loss=hist.groupby('model').loss.transform(lambda l: l.rolling(20, min_periods=1).mean()))
sns.lineplot(sm, x='step', y='loss', hue='model', palette=palette, ax=ax)
t = timing.set_index('model').loc['DermCLIP (trained)']
ax.set_title(f"Training on {int(t.n_train)} images: DermCLIP {t.total_seconds / 60:.1f} min wall ({t.stems_seconds / 60:.1f} frozen stems), "
             f"{t.cpu_seconds / 60:.1f} CPU-min", fontsize=10)
out.png(fig, 'dermclip_loss')
print(f'DermCLIP section {time.time() - t_clip:.0f}s (training included on a cache miss); notebook total {time.time() - t_start:.0f}s')
timing.round(1)
