# %% [markdown]
# # DiffSeg: weakly supervised lesion segmentation from diffusion difference
#
# Reproduces the figures and the comparison table of *DiffSeg* (ISIC 2018) on real data. The diffusion model learns
# "lesion skin" (whole dermoscopic images) and "healthy skin" (reflect-tiled image corners, same geometry and
# vignette) from image-level information only; masks of the training split choose a few scalars (noise band,
# threshold, CRF); test masks only score. Compared on the ISIC 2018 test split and on PH2 (external): DiffSeg (a
# single output, the fused multi-output mask, + DenseCRF), `diffseg-distilled` (a U-Net trained on DiffSeg's own
# consistent regions), the training-free colour and Otsu baselines, and the supervised U-Net. The ablation records
# what each fix over the first version bought.

# %% tags=["parameters"]
profile = 'quick'
data_root = None
seed = 0
device = 'auto'
out_dir = 'figures/diffseg'

# %%
import json, time
import numpy as np, pandas as pd, seaborn as sns, matplotlib.pyplot as plt
from dermnb.runner import figure_setup
from dermnb.data import get_split, load_ph2
from dermnb.segmenter import load_segmenter, SegmenterConfig
from dermnb.diffseg import (DiffSeg, DiffSegConfig, DIFFSEG_V1, load_diffseg_backbone, load_diffseg, load_distilled, calibrate,
                            evaluate_diffseg, evaluate_method, comparison_table, uncertainty_error_correlation, otsu_method,
                            colour_method, unet_method, distilled_method, plot_difference, plot_steps, plot_consistency,
                            plot_table, healthy_tile, skin_corners, diffusion_difference, T_BAND, load_translation, load_teacher,
                            train_split_dice, training_sample, KEEPS)
from dermnb.core import load_image, load_mask
from dermnb.metrics import seg_metrics
out = figure_setup(profile, data_root, seed, device, out_dir)
root, P = out.root, out.profile
n_eval = P.n_eval or None                     # quick: a fixed subset of each test set; full: all images
timing = []
def timed(stage, t0): timing.append({'stage': stage, 'seconds': time.time() - t0})


# %% [markdown]
# ## Models (trained and cached on first use)
#
# The DiffSeg diffusion model (shortcut-free weak data, t uniform), and for the ablation the first version's model
# (corner crops, t uniform) and the same data trained in the noise band (tried, not kept). The supervised U-Net trains on the masks of the same training images.

# %%
t0 = time.time(); bb = load_diffseg_backbone(profile, root, device); timed('train DiffSeg model', t0)
t0 = time.time(); bb_v1 = load_diffseg_backbone(profile, root, device, style='crop'); timed('train v1 model (ablation)', t0)
t0 = time.time(); bb_band = load_diffseg_backbone(profile, root, device, t_range=T_BAND); timed('train band model (ablation)', t0)
t0 = time.time(); unet = load_segmenter(SegmenterConfig.for_profile(profile), root, device); timed('train U-Net', t0)
def _state(b): return json.loads((b.cache_dir/'train_state.json').read_text())
loss_u = pd.read_csv(unet.cache_dir/'loss.csv')
models = pd.DataFrame([
    *({'model': name, 'supervision': sup, 'steps': s['step'], 'images_seen': s['step'] * s['config']['batch_size'],
       't_range': str(s['config'].get('t_range') or 'uniform'), 'train_seconds': s.get('train_s', s.get('elapsed_s')), 'stopped': s['stopped']}
      for name, sup, s in (('DiffSeg diffusion model', 'image-level: whole images = lesion, tiled corners = healthy skin', _state(bb)),
                           ('v1 diffusion model (ablation)', 'image-level: whole images = lesion, corner crops = healthy skin', _state(bb_v1)),
                           ('band-trained model (ablation)', 'as the DiffSeg model, t drawn in the band', _state(bb_band)))),
    {'model': 'U-Net (EfficientNet-Lite0 encoder)', 'supervision': 'pixel masks of the same training images', 'steps': len(loss_u),
     'images_seen': len(loss_u) * unet.cfg.batch_size, 't_range': '', 'train_seconds': float(loss_u.seconds.iloc[-1]), 'stopped': 'done'}])
out.csv(models, 'models')
models

# %% [markdown]
# ## Fig. 3 table: which noise band? (training split)
#
# Fused-mask Dice (Otsu on the mean map, which does not depend on the map's unit) on the calibration images of the
# training split (a seeded random sample, `training_sample`), for the paper's band and deeper ones. The best band is
# the one used below.

# %%
t0 = time.time()
cal_recs = training_sample(root, 64)
cal_ims, cal_gts = [load_image(r.image) for r in cal_recs], [load_mask(r.mask) for r in cal_recs]
BANDS = {'paper 60-150': (60, 90, 120, 150), '100-300': (100, 200, 300), '200-400': (200, 300, 400), '300-450': (300, 375, 450)}
band_rows = []
for name, ts in BANDS.items():
    d = DiffSeg(bb, DiffSegConfig(timesteps=ts))
    dice = np.mean([seg_metrics(d.from_maps(i, m, crf=False)['mask'], g)['dice'] for i, m, g in zip(cal_ims, d.maps(cal_ims), cal_gts)])
    band_rows.append({'band': name, 'timesteps': str(ts), 'train_dice_fused': float(dice)})
bands = pd.DataFrame(band_rows); out.csv(bands, 'noise_band')
best_band = BANDS[bands.sort_values('train_dice_fused', ascending=False).band.iloc[0]]
timed('noise band (training split)', t0)
bands

# %% [markdown]
# ## Scale, evidence floor, threshold and CRF chosen on the training split

# %%
t0 = time.time()
ds = load_diffseg(profile, root, device, cfg=DiffSegConfig(timesteps=best_band))
out.csv(ds.calibration, 'calibration')
timed('calibration', t0)
print('chosen:', {k: v for k, v in ds.cfg.to_dict().items() if k in ('timesteps', 'scale', 'min_evidence', 'threshold', 'crf_clip', 'crf')})

# %% [markdown]
# ## The translation variant (Wolleb et al.), chosen or not on the training split
#
# The same model and weak data; each output is the image DDIM-inverted under "lesion" to a strength t*, translated
# back under "healthy skin" with guidance, minus the image (luminance). It is calibrated by the same rules on the same
# training images. Its guidance is chosen among `TRANSLATION_GUIDANCES` by the training-split Dice of the calibration
# (`load_translation`); the student below learns from whichever variant scores higher on the training split
# (`load_teacher`).

# %%
t0 = time.time()
ds_tr = load_translation(profile, root, device)
teacher = load_teacher(profile, root, device); teacher_name = teacher.variant
variants = pd.DataFrame([{'variant': 'difference (the paper)', 'guidance': ds.cfg.guidance, 'timesteps': str(ds.cfg.timesteps),
                          'outputs': len(ds.cfg.timesteps) * len(ds.cfg.seeds), 'train_split_dice_fused': train_split_dice(ds)}] +
                        [{'variant': 'translation (Wolleb)', 'guidance': w, 'timesteps': str(d.cfg.timesteps), 'outputs': len(d.cfg.timesteps),
                          'train_split_dice_fused': train_split_dice(d)} for w, d in ds_tr.candidates.items()])
variants['kept'] = [True] + [d is ds_tr for d in ds_tr.candidates.values()]
variants['teacher of the student'] = [teacher_name == 'difference'] + [teacher_name == 'translation' and d is ds_tr for d in ds_tr.candidates.values()]
out.csv(variants, 'variants'); timed('translation variant (calibration)', t0)
variants

# %% [markdown]
# ## No evidence, no lesion: healthy-skin tiles of test images
#
# An image of healthy skin should give a (near) empty mask. The tiles here come from ISIC 2018 *test* images (the
# calibration only saw training tiles).

# %%
test = get_split('isic2018_task1', 'test', root, seed=0)
ph2 = sorted(load_ph2(root), key=lambda r: r.id)
test_eval, ph2_eval = test[:n_eval], ph2[:n_eval]
tiles = [healthy_tile(im, c) for im in (load_image(r.image) for r in test_eval[:100]) for c in skin_corners(im)[:1]]
healthy = pd.DataFrame([{'method': name, 'n_tiles': len(tiles), 'evidence_floor': d.cfg.min_evidence,
                          'empty_mask_share': float(np.mean([not r['crf_mask'].any() for r in tres])),
                          'mean_predicted_area': float(np.mean([r['crf_mask'].mean() for r in tres]))}
                        for name, d in (('DiffSeg + CRF', ds), ('DiffSeg translation + CRF', ds_tr)) for tres in [d.segment(tiles)]])
out.csv(healthy, 'healthy_tiles'); healthy

# %% [markdown]
# ## Fig. 2: the diffusion difference

# %%
for k, rec in enumerate(test_eval[:3]):
    out.png(plot_difference(ds, rec, t=ds.cfg.timesteps[len(ds.cfg.timesteps) // 2]), f'fig2_difference_{k}')

# %% [markdown]
# ## Fig. 3: outputs across noise steps

# %%
out.png(plot_steps(ds, test_eval[3:7]), 'fig3_steps')

# %% [markdown]
# ## Fig. 4/5: consistent and ambiguous regions

# %%
out.png(plot_consistency(ds, test_eval[7:11]), 'fig45_consistency')

# %% [markdown]
# ## The distilled student (`diffseg-distilled`)
#
# Trained on DiffSeg's pseudo-labels of the training split: where the teacher's outputs agree, the label of its CRF
# mask; where they disagree (ambiguous), no label (weight 0). Images where the teacher found no evidence are left out,
# and no mask is read. The teacher is the variant with the higher training-split Dice (table above); the label source
# (`pseudo_label`) was chosen on ISIC validation. A second student then learns from the first one's flip-consistent
# regions of the same images (`self_label_dataset`); the ablation reports both rounds.

# %%
t0 = time.time(); student = load_distilled(profile, root, device, ds=teacher); timed('pseudo-labels + train student', t0)
student_source = student.source
out.csv(pd.DataFrame([{'teacher': teacher_name, 'source': student.source, 'self_training_rounds': student.rounds, **student.pseudo_stats}]),
        'pseudo_labels')
pd.DataFrame([student.pseudo_stats])

# %% [markdown]
# ## The comparison table

# %%
t0 = time.time()
per_image = []
for name, recs in (('ISIC 2018 test', test_eval), ('PH2 (external)', ph2_eval)):
    per_image.append(evaluate_diffseg(ds, recs, name))
    per_image.append(evaluate_diffseg(ds_tr, recs, name, prefix='DiffSeg translation'))
    per_image.append(evaluate_method(distilled_method(student), 'diffseg-distilled', recs, name))
    per_image.append(evaluate_method(colour_method, 'colour baseline', recs, name))
    per_image.append(evaluate_method(otsu_method, 'Otsu', recs, name))
    per_image.append(evaluate_method(unet_method(unet), 'U-Net (supervised)', recs, name))
per_image = pd.concat(per_image, ignore_index=True)
out.csv(per_image, 'per_image')
table = comparison_table(per_image)
out.csv(table, 'comparison')
out.png(plot_table(table, f'DiffSeg comparison ({profile} profile, mean over images)'), 'comparison_table')
timed('comparison (test + PH2)', t0)
table

# %% [markdown]
# ## Ablation: what each fix bought
#
# Cumulative rows from the first version's pipeline. The inference-side fixes are applied first, on the first
# version's model (corner-crop weak data, t uniform), then the model is swapped for the one trained on shortcut-free
# data, then the image-only priors (vignette excluded, the calibration may keep the central component), then the CRF
# guard, then the student (round 1 on DiffSeg's labels, round 2 on its own). Rows 1-4b keep the earlier mask rules (all components or the largest, vignette included). Row 4b is the training band, measured and not kept. Every row is calibrated on the same training images (its
# best training-split Dice is in `ablation_long.csv`); rows 1-4c are scored on the first 100 images of each set, to
# keep the figure within its budget, rows 5-7 on the full sets (n in the table).

# %%
t0 = time.time()
UNGUARDED = dict(crf_unary='minmax', crf_max_area_change=0.)
EARLIER_RULES = dict(exclude_vignette=False)          # rows 1-4b: no vignette rule, and the calibration keeps all or the largest component
EARLIER_KEEPS = ('all', 'largest')
band_name = f't {best_band[0]}-{best_band[-1]}'
steps = [('1. first version (corner crops, t uniform; |ε| difference at t 60-150, min-max per map, Otsu, CRF)', bb_v1, DIFFSEG_V1, EARLIER_KEEPS),
         (f'2. + noise band at inference ({band_name})', bb_v1, DIFFSEG_V1.replace(timesteps=best_band), EARLIER_KEEPS),
         ('3. + signed x̂0 difference, guidance, one shared unit', bb_v1, DiffSegConfig(timesteps=best_band, **UNGUARDED, **EARLIER_RULES), EARLIER_KEEPS),
         ('4. + shortcut-free weak data (tiled corners, shared vignette)', bb, DiffSegConfig(timesteps=best_band, **UNGUARDED, **EARLIER_RULES), EARLIER_KEEPS),
         ('4b. tried, not kept: + training in the band 150-450', bb_band, DiffSegConfig(timesteps=best_band, **UNGUARDED, **EARLIER_RULES), EARLIER_KEEPS),
         ('4c. + image-only priors (vignette excluded, central component allowed)', bb, DiffSegConfig(timesteps=best_band, **UNGUARDED), KEEPS)]
abl = []
n_abl = 100                                   # images per set for the intermediate rows (the budget); the last rows reuse the full table
for name, b, c, keeps in steps:
    cal_c, cal_t = calibrate(DiffSeg(b, c), cal_recs, keeps=keeps)
    for dname, recs in (('ISIC 2018 test', test_eval[:n_abl]), ('PH2 (external)', ph2_eval[:n_abl])):
        t = comparison_table(evaluate_diffseg(DiffSeg(b, cal_c), recs, dname)).set_index('method')
        abl.append({'step': name, 'dataset': dname, 'dice_fused': t.loc['DiffSeg', 'dice'], 'dice_crf': t.loc['DiffSeg + CRF', 'dice'],
                    'train_split_dice_fused': cal_t[cal_t.param == 'mask rule'].dice.max(), 'n': len(recs)})
fin = table.set_index(['dataset', 'method'])
r1_dice = {dname: evaluate_method(distilled_method(student.round1), 'round 1', recs, dname).dice.tolist()
           for dname, recs in (('ISIC 2018 test', test_eval), ('PH2 (external)', ph2_eval))}
for dname in ('ISIC 2018 test', 'PH2 (external)'):
    abl.append({'step': '5. + CRF guard (clipped unary, area-change rejection)', 'dataset': dname, 'n': int(fin.loc[(dname, 'DiffSeg'), 'n']),
                'dice_fused': fin.loc[(dname, 'DiffSeg'), 'dice'], 'dice_crf': fin.loc[(dname, 'DiffSeg + CRF'), 'dice']})
    abl.append({'step': '5b. translation variant (Wolleb), + CRF guard', 'dataset': dname, 'n': int(fin.loc[(dname, 'DiffSeg translation'), 'n']),
                'dice_fused': fin.loc[(dname, 'DiffSeg translation'), 'dice'], 'dice_crf': fin.loc[(dname, 'DiffSeg translation + CRF'), 'dice']})
    abl.append({'step': f'6. + distilled student, round 1 (teacher: {teacher_name}, labels: {student_source})', 'dataset': dname, 'n': len(r1_dice[dname]),
                'dice_fused': float(np.mean(r1_dice[dname])), 'dice_crf': np.nan})
    abl.append({'step': '7. + self-training round 2 (diffseg-distilled)', 'dataset': dname, 'n': int(fin.loc[(dname, 'diffseg-distilled'), 'n']),
                'dice_fused': fin.loc[(dname, 'diffseg-distilled'), 'dice'], 'dice_crf': np.nan})
ablation = pd.DataFrame(abl).pivot(index='step', columns='dataset', values=['dice_fused', 'dice_crf', 'n'])
ablation.columns = [f'{m} {d}' for m, d in ablation.columns]; ablation = ablation.reset_index()
out.csv(ablation, 'ablation'); out.csv(pd.DataFrame(abl), 'ablation_long')
out.png(plot_table(ablation, 'DiffSeg ablation (cumulative, Dice)'), 'ablation_table')
timed('ablation', t0)
ablation

# %% [markdown]
# ## Is the uncertainty meaningful? GED of the outputs vs error
#
# The uncertainty of an image is the GED diversity of its outputs; an image below the evidence floor abstains and
# gets 1 (`06_diffseg`, "Multiple outputs"). The student's outputs are its 4 flips.

# %%
corr = pd.concat([uncertainty_error_correlation(per_image, m) for m in ('DiffSeg + CRF', 'DiffSeg translation + CRF', 'diffseg-distilled')],
                 ignore_index=True)
out.csv(corr, 'uncertainty_correlation')
d = per_image[per_image.method.isin(['DiffSeg + CRF', 'DiffSeg translation + CRF', 'diffseg-distilled'])].assign(error=lambda x: 1 - x.dice)
g = sns.lmplot(d, x='uncertainty', y='error', col='dataset', row='method', height=3, scatter_kws={'s': 10, 'alpha': .5})
for (mname, dname), ax in g.axes_dict.items():
    r = corr[(corr.method == mname) & (corr.dataset == dname)].iloc[0]
    ax.set_title(f"{mname}, {dname}: Spearman ρ = {r.spearman_rho:.2f}", fontsize=9)
g.set_axis_labels('uncertainty (GED diversity of the outputs)', 'error (1 − Dice)')
out.png(g.figure, 'uncertainty_vs_error')
corr

# %% [markdown]
# ## Failure cases with the highest uncertainty

# %%
dd = per_image[per_image.method == 'DiffSeg + CRF']
worst = dd.sort_values('uncertainty', ascending=False).head(4)
by_id = {r.id: r for r in test_eval + ph2_eval}
out.png(plot_consistency(ds, [by_id[i] for i in worst.id]), 'failures_high_uncertainty')
worst[['dataset', 'id', 'dice', 'uncertainty', 'ged']]

# %% [markdown]
# ## Where the time went
#
# Every stage, training included (a stage whose model was cached takes seconds). The budget is 10 minutes for
# the whole figure from an empty cache; the summary says how far this run is from it.

# %%
tim = pd.DataFrame(timing); out.csv(tim, 'timing')
training = tim.stage.str.startswith('train') | tim.stage.str.contains('train student')
summary = pd.DataFrame([{'training_s': tim.seconds[training].sum(), 'other_s': tim.seconds[~training].sum(), 'total_s': tim.seconds.sum(),
                         'budget_s': 600., 'over_budget_x': tim.seconds.sum() / 600.}])
out.csv(summary, 'timing_summary'); display(tim); summary
