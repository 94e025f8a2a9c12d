# %% [markdown]
# # Data overview: a dataset card
#
# Sample grids with lesion contours (ground truth in green), diagnosis and concept distributions, image sizes and
# lesion areas, and the split sizes of every dataset the methods use. All numbers are computed from the data root.

# %% tags=["parameters"]
profile = 'quick'
data_root = None
seed = 0
device = 'auto'
out_dir = 'figures/data_overview'

# %%
import json
import pandas as pd, seaborn as sns, matplotlib.pyplot as plt
from dermnb.core import load_image, load_mask, image_grid
from dermnb.data import data_summary, get_split, records_frame, LOADERS
from dermnb.runner import figure_setup
out = figure_setup(profile, data_root, seed, device, out_dir)
root = out.root

# %% [markdown]
# ## Counts per dataset and split

# %%
summary = data_summary(root, seed)
counts = pd.DataFrame([{'dataset': k, 'images': v.get('images', 0), 'masks': v.get('masks', 0), 'skipped': v.get('skipped', 0),
                        **{f'split_{s}': n for s, n in v.get('splits', {}).items()}} for k, v in summary.items()])
out.csv(counts, 'counts')
counts

# %%
records = {name: get_split(name, None, root, seed) for name in LOADERS}
frame = pd.concat([records_frame(r, mask_fraction=True) for r in records.values()], ignore_index=True)
out.csv(frame[['id', 'source', 'split']], 'splits')
split_sizes = frame.groupby(['source', 'split']).size().rename('images').reset_index()
out.csv(split_sizes, 'split_sizes')
fig, ax = plt.subplots(figsize=(7, 3.5))
sns.barplot(split_sizes, x='source', y='images', hue='split', hue_order=['train', 'val', 'test'], ax=ax)
ax.set_title(f'Leak-free splits (seed {seed})'); ax.set_xlabel('')
out.png(fig, 'split_sizes')

# %% [markdown]
# ## Samples with ground-truth contours

# %%
for name, recs in records.items():
    sample = sorted(recs, key=lambda r: r.id)[::max(1, len(recs) // 12)][:12]
    imgs = [load_image(r.image) for r in sample]
    masks = [load_mask(r.mask) if r.mask else None for r in sample]
    fig = image_grid(imgs, [f'{r.id}\n{r.diagnosis or "unlabelled"}' for r in sample], ncols=6,
                     masks=masks if any(m is not None for m in masks) else None, suptitle=f'{name}: samples')
    out.png(fig, f'samples_{name}')

# %% [markdown]
# ## Diagnoses

# %%
dx = frame.groupby(['source', 'diagnosis']).size().rename('images').reset_index()
out.csv(dx, 'diagnosis_counts')
g = sns.catplot(dx, kind='bar', y='diagnosis', x='images', col='source', col_wrap=2, sharex=False, sharey=False, height=2.8, aspect=1.6)
g.set_titles('{col_name}'); g.figure.suptitle('Diagnosis (shared vocabulary) per dataset', y=1.02)
out.png(g.figure, 'diagnosis_counts')

# %% [markdown]
# ## Concepts: PH2 dermoscopic structures and Derm7pt 7-point criteria

# %%
ccols = [c for c in frame if c.startswith('concept_') and not c.startswith('concept_crowd')]
concepts = (frame.melt(id_vars=['source'], value_vars=ccols, var_name='concept', value_name='value').dropna()
                 .assign(concept=lambda d: d.concept.str.removeprefix('concept_'), value=lambda d: d.value.astype(str)))
concept_counts = concepts.groupby(['source', 'concept', 'value']).size().rename('images').reset_index()
out.csv(concept_counts, 'concept_counts')
for src in concept_counts.source.unique():
    sub = concept_counts[(concept_counts.source == src) & (concept_counts.concept != 'colors')]
    g = sns.catplot(sub, kind='bar', y='value', x='images', col='concept', col_wrap=4, sharey=False, height=2.4, aspect=1.3)
    g.set_titles('{col_name}'); g.figure.suptitle(f'{src}: concept distributions', y=1.03)
    out.png(g.figure, f'concepts_{src}')

# %%
crowd = frame.melt(id_vars=['source'], value_vars=[c for c in frame if c.startswith('concept_crowd')], var_name='criterion', value_name='score').dropna()
fig, ax = plt.subplots(figsize=(7, 3))
sns.boxplot(crowd.assign(criterion=crowd.criterion.str.removeprefix('concept_crowd_')), x='criterion', y='score', hue='source', ax=ax)
ax.set_title('ENHANCE crowd scores (mean of 3 raters)')
out.png(fig, 'enhance_crowd_scores')

# %% [markdown]
# ## Image sizes and lesion areas

# %%
size_stats = frame.groupby('source')[['width', 'height']].describe().round(1)
size_stats.columns = ['_'.join(c) for c in size_stats.columns]
out.csv(size_stats.reset_index(), 'image_sizes')
fig, axs = plt.subplots(1, 2, figsize=(10, 3.2))
sns.countplot(frame.assign(size=frame.width.astype(str) + 'x' + frame.height.astype(str)), y='size', hue='source', ax=axs[0])
axs[0].set_title('Image sizes (pixels)')
sns.histplot(frame.dropna(subset=['mask_fraction']), x='mask_fraction', hue='source', stat='density', common_norm=False, bins=30, ax=axs[1])
axs[1].set_title('Lesion area / image area')
fig.tight_layout(); out.png(fig, 'sizes_and_lesion_area')
frame.groupby('source').mask_fraction.describe().round(3)
