# %% [markdown]
# # CPDE: context-preserving dermoscopic attribute editing
#
# The paper's comparison and ablation on real held-out PH2 and Derm7pt images: Asyrp (a DeltaBlock per edit, global
# losses), the DiffusionCLIP-style baseline (LoRA of the denoiser), w/ Masking (DeltaBlocks with the mask-guided dual
# branch and background blending), w/ SCT (one semantic module, global losses) and CPDE (SCT + masks + blending), each
# adding and removing five attributes. FID on the standard Inception against the unedited originals, S_dir with the
# concept-aware DermCLIP, NS-LPIPS with the project's uncalibrated LPIPS-style distance; then segmentation and
# diagnostic consistency, edit confirmation by the concept classifier, and counterfactual augmentation. The paper's
# numbers are printed beside ours; its FID scale is not the Inception one, so orderings and ratios compare.

# %% tags=["parameters"]
profile = 'quick'
data_root = None
seed = 0
device = 'auto'
out_dir = 'figures/cpde'

# %%
import time, json
import numpy as np, pandas as pd, seaborn as sns, matplotlib.pyplot as plt, torch
from dermnb.core import image_grid, tensor_to_image
from dermnb.base import fid_kid
from dermnb.metrics import inception_features
from dermnb.segmenter import load_segmenter, predict_proba, SegmenterConfig
from dermnb.lesiongen import load_concept_classifier, lite0_features, CONCEPTS
from dermnb.cpde import (ALL_EDITS, Edit, METHODS, METHOD_NAMES, PAPER, DCLIP_STEPS, cpde_images, load_editor, load_diffusionclip, cached_inversion,
                         apply_editor, apply_diffusionclip, edit_schedule, source_pairs, edit_metrics, comparison, diagnosis_head, paired_difference,
                         counterfactual_augmentation)
from dermnb.runner import figure_setup
out = figure_setup(profile, data_root, seed, device, out_dir)
root = out.root
S = {'quick': dict(per_edit_test=16, mask_method='unet', cf_seeds=(0, 1, 2), cf_n=24),
     'full': dict(per_edit_test=32, mask_method='unet', cf_seeds=(0, 1, 2), cf_n=200)}[out.profile.name]
times, t0 = [], time.time()
def lap(what):
    global t0
    times.append({'step': what, 'seconds': round(time.time() - t0, 1)}); t0 = time.time()


# %% [markdown]
# ## t_edit and t_addnoise by Asyrp's LPIPS rule, measured on our backbone

# %%
editors = {m: load_editor(m, profile, root, device, S['mask_method']) for m in METHODS}
ed0, cfg0, conds, bb, clip = editors['cpde']
train = cpde_images('train', S['mask_method'], profile, root, device)
sched = edit_schedule(bb, train, clip)
out.csv(sched['curves'], 'lpips_curves')
fig, ax = plt.subplots(figsize=(6, 3.2))
c = sched['curves']; ax.plot(c.t, c.d_x0 / c.d_x0.iloc[0], label='x̂0 of the reconstruction'); ax.plot(c.t, c.d_xt / c.d_xt.iloc[0], label='noised image x_t')
ax.axvline(sched['t_edit'], color='C0', ls='--'); ax.axvline(sched['t_addnoise'], color='C1', ls='--')
ax.set_xlabel('t'); ax.set_ylabel('LPIPS-style distance / plateau'); ax.legend(fontsize=8)
ax.set_title(f"t_edit = {sched['t_edit']}, t_addnoise = {sched['t_addnoise']} (official fixed values: 500, 200)")
out.png(fig, 'lpips_rule')
runs = pd.DataFrame([{'method': METHOD_NAMES[m], 'steps': len(pd.read_csv(e[0].cache_dir/'history.csv')),
                      'train_s': pd.read_csv(e[0].cache_dir/'history.csv').seconds.iloc[0], 'params': sum(p.numel() for p in e[0].parameters())}
                     for m, e in editors.items()])
lap('editors'); runs

# %% [markdown]
# ## Editing held-out images
#
# Per edit, `per_edit_test` test images in the source state (add: without the attribute; remove: with it). Two
# references go with the methods: CPDE with latent blending only (no pixel composite), and CPDE's whole pipeline with
# Δh = 0 (inversion, the η = 1 resampling below t_addnoise, blending, composite: everything but the edit). The second
# separates what the edit does from what the autoencoder and the resampling do, for segmentation consistency and for
# edit confirmation alike.

# %%
test = cpde_images('test', S['mask_method'], profile, root, device)
pairs = source_pairs(test, list(ALL_EDITS), S['per_edit_test'], seed + 1)
idx = [i for i, _ in pairs]; eidx = torch.tensor([e for _, e in pairs]); sub = test.subset(idx)
inv, inv_dc = cached_inversion(bb, sub, cfg0.steps), cached_inversion(bb, sub, DCLIP_STEPS)   # h-space methods: 40 steps; DiffusionCLIP: its 20
edited = {m: apply_editor(bb, e[0], e[1], sub, inv, eidx, e[2], seed=seed) for m, e in editors.items()}
dc = torch.zeros_like(sub.images)
for j, e in enumerate(ALL_EDITS):
    sel = (eidx == j).nonzero().flatten()
    if len(sel) == 0: continue
    unet, k0, _ = load_diffusionclip(e, profile, root, device, S['mask_method'])
    dc[sel] = apply_diffusionclip(bb, unet, k0, inv_dc.subset(sel.tolist()))
edited['diffusionclip'] = dc
edited['cpde (latent blending only)'] = apply_editor(bb, ed0, cfg0, sub, inv, eidx, conds, seed=seed, composite=False)
edited['cpde, no edit (Δh = 0)'] = apply_editor(bb, ed0, cfg0, sub, inv, eidx, conds, seed=seed, strength=0.)
lap('editing')

# %% [markdown]
# ## The comparison and the ablation, beside the paper
#
# Each ordering is also read from the per-image paired difference (every method edits the same images): its mean,
# standard error and z; `significant` marks |z| ≥ 2. FID is a set statistic and has no paired error here.

# %%
judge = load_concept_classifier(root=root); dxh = diagnosis_head(root); unet_seg = load_segmenter(SegmenterConfig.for_profile(profile), root, device)
edits_of = [ALL_EDITS[j] for j in eidx.tolist()]
per = pd.concat([edit_metrics(sub.images, x, sub.masks, edits_of, clip, judge, dxh, unet_seg, device).assign(method=m) for m, x in edited.items()], ignore_index=True)
out.csv(per, 'per_image')
ref = inception_features((sub.images + 1) / 2, device=device)
fids = {m: fid_kid(ref, x, device, seed) for m, x in edited.items()}
masks_src = ', '.join(sorted(set(sub.mask_source)))
table = comparison(per, fids, masks_src)
out.csv(table, 'comparison')
order = ['Asyrp', 'DiffusionCLIP', 'w/ Masking', 'w/ SCT', 'CPDE', 'cpde (latent blending only)', 'cpde, no edit (Δh = 0)']
show = table.set_index('method').loc[order, ['fid', 'paper_fid', 's_dir', 'paper_s_dir', 'ns_lpips', 'paper_ns_lpips', 'seg_dice', 'dx_consistency', 'n']]
tm = table.set_index('method')
def claim(text, holds, ratio=None, metric=None, a=None, b=None):
    "One ordering, with the paired per-image difference a − b (its SE and z) where the metric is per image."
    r = {'claim': text, 'holds': bool(holds), 'ratio': ratio}
    if metric: r.update({f'paired_{k}': v for k, v in paired_difference(per, metric, a, b).items()})
    return r
det_gain = lambda m: tm.loc[m, 'add_detected_after'] - tm.loc[m, 'add_detected_before']
checks = pd.DataFrame([
    claim('CPDE beats Asyrp on FID', show.loc['CPDE', 'fid'] < show.loc['Asyrp', 'fid'], show.loc['CPDE', 'fid'] / show.loc['Asyrp', 'fid']),
    claim('CPDE beats Asyrp on S_dir', show.loc['CPDE', 's_dir'] > show.loc['Asyrp', 's_dir'], None, 's_dir', 'cpde', 'asyrp'),
    claim('CPDE beats Asyrp on NS-LPIPS', show.loc['CPDE', 'ns_lpips'] < show.loc['Asyrp', 'ns_lpips'], show.loc['CPDE', 'ns_lpips'] / show.loc['Asyrp', 'ns_lpips'], 'ns_lpips', 'cpde', 'asyrp'),
    claim('w/ Masking NS-LPIPS <= 1/5 of Asyrp', show.loc['w/ Masking', 'ns_lpips'] <= show.loc['Asyrp', 'ns_lpips'] / 5,
          show.loc['w/ Masking', 'ns_lpips'] / show.loc['Asyrp', 'ns_lpips'], 'ns_lpips', 'masking', 'asyrp'),
    claim('w/ SCT S_dir > Asyrp', show.loc['w/ SCT', 's_dir'] > show.loc['Asyrp', 's_dir'], None, 's_dir', 'sct', 'asyrp'),
    claim('CPDE segmentation consistency Dice >= 0.9', show.loc['CPDE', 'seg_dice'] >= .9, show.loc['CPDE', 'seg_dice']),
    claim('CPDE add: detection rises >= 20 points', det_gain('CPDE') >= .2, det_gain('CPDE')),
    claim('CPDE add: detection vs its own Δh = 0 reconstruction rises >= 20 points (reference, not the target)',
          tm.loc['CPDE', 'add_detected_after'] - tm.loc['cpde, no edit (Δh = 0)', 'add_detected_after'] >= .2,
          tm.loc['CPDE', 'add_detected_after'] - tm.loc['cpde, no edit (Δh = 0)', 'add_detected_after'])])
checks['significant'] = (checks.paired_z.abs() >= 2).where(checks.paired_z.notna())
out.csv(checks, 'orderings')
lap('metrics'); show.round(3)

# %%
checks

# %% [markdown]
# ## Qualitative grid: original / Asyrp / DiffusionCLIP-style / CPDE, per attribute, add and remove

# %%
cols = ['original', 'asyrp', 'diffusionclip', 'cpde']; ims, titles = [], []
for j, e in enumerate(ALL_EDITS):
    sel = (eidx == j).nonzero().flatten()
    if len(sel) == 0: continue
    k = int(sel[0]); ims += [sub.images[k]] + [edited[m][k] for m in cols[1:]]
    titles += [f'{e.name}: original'] + [METHOD_NAMES[m] for m in cols[1:]]
out.png(image_grid(ims, titles=titles, ncols=8, size=1.6, suptitle='Edits, two per row: original, Asyrp, DiffusionCLIP-style, CPDE'), 'qualitative')

# %% [markdown]
# ## Segmentation consistency: ground-truth contour green, the edited image's U-Net mask red

# %%
k = list(range(0, len(sub), max(1, len(sub) // 8)))[:8]
pm = predict_proba(unet_seg, [tensor_to_image(edited['cpde'][i]) for i in k])
fig = image_grid([edited['cpde'][i] for i in k], titles=[f"{edits_of[i].name}\nDice {per[(per.method == 'cpde')].seg_dice.iloc[i]:.2f}" for i in k],
                 masks=[sub.masks[i][0].numpy() > .5 for i in k], preds=[p > .5 for p in pm], ncols=8, size=1.7,
                 suptitle=f'CPDE edits: original mask (green, {masks_src}) vs U-Net on the edited image (red)')
out.png(fig, 'segmentation_consistency'); lap('figures')

# %% [markdown]
# ## Counterfactual augmentation for long-tailed attributes
#
# For the two rarest edited attributes in the training data, an attribute detector trained on real images only
# against one trained with CPDE counterfactuals (train images edited to gain or lose the attribute), recall on the
# held-out images that have it.

# %%
counts = {e.attribute: int(train.labels[e.concept].sum()) for e in ALL_EDITS if e.direction == 'add'}
rare = sorted(counts, key=counts.get)[:2]
real_X = lite0_features(train.images).numpy(); test_X = lite0_features(test.images).numpy()
cf_rows = []
for a in rare:
    e_add, e_rem = Edit(a, 'add'), Edit(a, 'remove'); ja, jr = list(ALL_EDITS).index(e_add), list(ALL_EDITS).index(e_rem)
    ry, ty = train.labels[e_add.concept].to_numpy().astype(int), test.labels[e_add.concept].to_numpy().astype(int)
    for s in S['cf_seeds']:
        pr = source_pairs(train, [e_add, e_rem], S['cf_n'], seed=100 + s)
        ii = [i for i, _ in pr]; ee = torch.tensor([ja if e == 0 else jr for _, e in pr])
        sub_t = train.subset(ii); cf = apply_editor(bb, ed0, cfg0, sub_t, cached_inversion(bb, sub_t, cfg0.steps), ee, conds, seed=s)
        cy = np.array([1 if e == 0 else 0 for _, e in pr])
        r = counterfactual_augmentation(real_X, ry, lite0_features(cf).numpy(), cy, test_X, ty, s)
        for arm, v in r.items(): cf_rows.append({'attribute': a, 'train_positives': counts[a], 'seed': s, 'arm': arm, **v, 'n_counterfactuals': len(cy), 'test_positives': int(ty.sum())})
cfa = pd.DataFrame(cf_rows); out.csv(cfa, 'counterfactual_augmentation')
cfs = cfa.groupby(['attribute', 'arm']).recall.agg(['mean', 'std']).reset_index(); out.csv(cfs, 'counterfactual_summary')
fig, ax = plt.subplots(figsize=(6, 3)); sns.barplot(cfa, x='attribute', y='recall', hue='arm', errorbar='sd', ax=ax)
ax.set_title(f"Recall on held-out images with the attribute ({len(S['cf_seeds'])} seeds)"); out.png(fig, 'counterfactual_augmentation')
lap('augmentation'); out.csv(pd.DataFrame(times), 'timings'); cfs.round(3)
