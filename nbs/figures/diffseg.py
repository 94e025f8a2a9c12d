# %% [markdown]
# # DiffSeg: weakly supervised lesion segmentation from diffusion difference
#
# Reproduces the figures and the comparison table of *DiffSeg* (ISIC 2018) on real data: the diffusion model learns
# "lesion skin" (whole dermoscopic images) and "healthy skin" (image corner crops) from image-level information only;
# masks of the training split choose two scalars (threshold, CRF parameters); test masks only score.
# Compared on the ISIC 2018 test split and on PH2 (external): DiffSeg without and with DenseCRF, a single output,
# Otsu thresholding, and the supervised U-Net trained on the same training images.

# %% tags=["parameters"]
profile = 'quick'
data_root = None
seed = 0
device = 'auto'
out_dir = 'figures/diffseg'

# %%
import json
import pandas as pd, seaborn as sns, matplotlib.pyplot as plt
from dermnb.core import data_root as resolve_root, seed_everything, get_profile, cached_dir, save_json
from dermnb.data import get_split, load_ph2
from dermnb.segmenter import load_segmenter, SegmenterConfig
from dermnb.diffseg import *
from dermnb.runner import FigureOut
seed_everything(seed)
root = resolve_root(data_root)
out = FigureOut(out_dir, profile, root, seed, device=device)
P = get_profile(profile)
n_eval = P.n_eval or None                     # quick: a fixed subset of each test set; full: all images

# %% [markdown]
# ## Models (trained and cached on first use)

# %%
bb = load_diffseg_backbone(profile, root, device)
train_state = json.loads((bb.cache_dir/'train_state.json').read_text())
unet = load_segmenter(SegmenterConfig.for_profile(profile), root, device)
models = pd.DataFrame([
    {'model': 'DiffSeg diffusion model', 'supervision': 'image-level: whole images = lesion, corner crops = healthy skin',
     'steps': train_state['step'], 'images_seen': train_state['step'] * train_state['config']['batch_size'],
     'train_seconds': train_state.get('train_s', train_state.get('elapsed_s')), 'stopped': train_state['stopped']},
    {'model': 'U-Net (EfficientNet-Lite0 encoder)', 'supervision': 'pixel masks of the same training images',
     'steps': len(pd.read_csv(unet.cache_dir/'loss.csv')), 'images_seen': len(pd.read_csv(unet.cache_dir/'loss.csv')) * unet.cfg.batch_size,
     'train_seconds': float(pd.read_csv(unet.cache_dir/'loss.csv').seconds.iloc[-1]), 'stopped': 'done'}])
out.csv(models, 'models')
models

# %% [markdown]
# ## Threshold and CRF chosen on the training split

# %%
train_recs = get_split('isic2018_task1', 'train', root, seed=0)[:64]
ds0 = DiffSeg(bb, DiffSegConfig())
cfg, cal = calibrate(ds0, train_recs)
out.csv(cal, 'calibration')
ds = DiffSeg(bb, cfg)
print('chosen threshold:', 'otsu' if cfg.threshold is None else cfg.threshold, '| CRF:', cfg.crf)

# %% [markdown]
# ## Fig. 2: the diffusion difference

# %%
test = get_split('isic2018_task1', 'test', root, seed=0)
ph2 = sorted(load_ph2(root), key=lambda r: r.id)
test_eval, ph2_eval = test[:n_eval], ph2[:n_eval]
for k, rec in enumerate(test_eval[:3]):
    out.png(plot_difference(bb, ds, rec, t=cfg.timesteps[1]), f'fig2_difference_{k}')

# %% [markdown]
# ## Fig. 3: outputs across noise steps

# %%
out.png(plot_steps(ds, test_eval[3:7]), 'fig3_steps')

# %% [markdown]
# ## Fig. 4/5: consistent and ambiguous regions

# %%
out.png(plot_consistency(ds, test_eval[7:11]), 'fig45_consistency')

# %% [markdown]
# ## The comparison table

# %%
per_image = []
for name, recs in (('ISIC 2018 test', test_eval), ('PH2 (external)', ph2_eval)):
    per_image.append(evaluate_diffseg(ds, recs, name))
    per_image.append(evaluate_method(otsu_method, 'Otsu', recs, name))
    per_image.append(evaluate_method(unet_method(unet), 'U-Net (supervised)', recs, name))
per_image = pd.concat(per_image, ignore_index=True)
out.csv(per_image, 'per_image')
table = comparison_table(per_image)
out.csv(table, 'comparison')
out.png(plot_table(table, f'DiffSeg comparison ({profile} profile, mean over images)'), 'comparison_table')
table

# %% [markdown]
# ## Is the uncertainty meaningful? GED of the outputs vs error

# %%
corr = uncertainty_error_correlation(per_image)
out.csv(corr, 'uncertainty_correlation')
d = per_image[per_image.method == 'DiffSeg + CRF'].assign(error=lambda x: 1 - x.dice)
g = sns.lmplot(d, x='uncertainty', y='error', col='dataset', height=3.2, scatter_kws={'s': 10, 'alpha': .5})
for ax, (_, r) in zip(g.axes.flat, corr.iterrows()): ax.set_title(f"{r.dataset}: Spearman ρ = {r.spearman_rho:.2f}")
g.set_axis_labels('uncertainty (output diversity)', 'error (1 − Dice)')
out.png(g.figure, 'uncertainty_vs_error')
corr

# %% [markdown]
# ## Failure cases with the highest uncertainty

# %%
worst = d.sort_values('uncertainty', ascending=False).head(4)
by_id = {r.id: r for r in test_eval + ph2_eval}
out.png(plot_consistency(ds, [by_id[i] for i in worst.id]), 'failures_high_uncertainty')
worst[['dataset', 'id', 'dice', 'uncertainty', 'ged']]
