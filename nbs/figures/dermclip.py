# %% [markdown]
# # DermCLIP: zero-shot diagnosis and retrieval
#
# DermCLIP (EfficientNet-Lite0 ImageNet + all-MiniLM-L6-v2 towers, trained contrastively on concept captions) against
# the same model before contrastive training (pretrained towers, untrained projections), the same architecture from
# random initialisation trained with the same recipe, and chance. Zero-shot accuracy and balanced accuracy on the
# ISIC 2019 and PH2 test splits; image→text and text→image recall@1/5 on a held-out pool of test images.

# %% tags=["parameters"]
profile = 'quick'
data_root = None
seed = 0
device = 'auto'
out_dir = 'figures/dermclip'

# %%
import pandas as pd, seaborn as sns, matplotlib.pyplot as plt
from dermnb.core import data_root as resolve_root, seed_everything
from dermnb.clip import dermclip_table
from dermnb.runner import FigureOut
seed_everything(seed)
root = resolve_root(data_root)
out = FigureOut(out_dir, profile, root, seed, device=device)
sns.set_theme(style='whitegrid', context='notebook')

# %% [markdown]
# ## The table
#
# Trains DermCLIP and the random-tower baseline on a cache miss (minutes on a CPU in the quick profile), then
# evaluates all models on the same held-out images.

# %%
table = dermclip_table(profile, root, seed, device=device)
out.csv(table, 'dermclip_table')
table.round(3)

# %%
metrics = {'isic2019_acc': 'ISIC 2019\naccuracy', 'isic2019_bal_acc': 'ISIC 2019\nbalanced acc.', 'ph2_acc': 'PH2 (3 classes)\naccuracy',
           'ph2_bal_acc': 'PH2 (3 classes)\nbalanced acc.', 'ph2_mel_nev_bal_acc': 'PH2 mel. vs nevus\nbalanced acc.',
           'i2t_R@1': 'image→text\nR@1', 'i2t_R@5': 'image→text\nR@5', 't2i_R@1': 'text→image\nR@1', 't2i_R@5': 'text→image\nR@5'}
long = table.melt(id_vars='model', value_vars=list(metrics), var_name='metric', value_name='value')
long['metric'] = long.metric.map(metrics)
n = table.iloc[0]
fig, axs = plt.subplots(1, 2, figsize=(15, 4.8), gridspec_kw={'width_ratios': [5, 4]})
palette = dict(zip(table.model, sns.color_palette('deep', len(table) - 1) + [(.6, .6, .6)]))
for ax, keys, title in ((axs[0], list(metrics)[:5], f"Zero-shot diagnosis (ISIC 2019 test n={n.n_isic2019}, PH2 test n={n.n_ph2})"),
                        (axs[1], list(metrics)[5:], f"Retrieval on {n.n_retrieval} held-out test images")):
    sub = long[long.metric.isin([metrics[k] for k in keys])]
    sns.barplot(sub, x='metric', y='value', hue='model', palette=palette, ax=ax)
    ax.set_title(title); ax.set_xlabel(''); ax.set_ylabel(''); ax.set_ylim(0, 1); ax.get_legend().remove()
    for c in ax.containers: ax.bar_label(c, fmt='%.2f', fontsize=6, padding=1)
fig.legend(*axs[0].get_legend_handles_labels(), loc='lower center', ncol=len(table), bbox_to_anchor=(.5, -.06), frameon=False)
fig.suptitle(f'DermCLIP ({profile} profile): trained vs pretrained-untuned vs random towers vs chance', y=1.02)
fig.tight_layout(); out.png(fig, 'dermclip_bars')

# %% [markdown]
# ## Training curve
#
# open_clip's `ClipLoss` per step (symmetric cross-entropy over the batch, whose value at chance is log(batch size)),
# smoothed over 20 steps, for both trained models; and where their time went.

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
timing.round(1)
