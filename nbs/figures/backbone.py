# %% [markdown]
# # The diffusion backbone
#
# The shared backbone of every method. Quick profile: TAEF2's reconstruction quality on real ISIC images; the
# text-conditional base model in TAEF2 latent space against its pixel-space twin at equal CPU training time (loss
# curves, FID/KID vs training time, samples); and deterministic DDIM inversion of real test images with the base
# model. The models train on a cache miss (the latent model for a fixed number of steps, about the profile's
# `train_minutes` on a 2-core CPU, its pixel twin for about 30% of that, plus a one-time encoding of the training
# images), then everything comes from the cache.

# %% tags=["parameters"]
profile = 'quick'
data_root = None
seed = 0
device = 'auto'
out_dir = 'figures/backbone'

# %%
import json
import numpy as np, pandas as pd, seaborn as sns, matplotlib.pyplot as plt, torch
from dermnb.core import image_grid
from dermnb.base import taef2_psnr, backbone_comparison, load_base_model, inversion_error, base_dataset, generate
from dermnb.runner import figure_setup
out = figure_setup(profile, data_root, seed, device, out_dir)
root, quick = out.root, out.quick

# %% [markdown]
# ## TAEF2 reconstruction
#
# PSNR of the TAEF2 round trip on ISIC 2018 test images, at their stored size and squashed to the base model's size.

# %%
tp = taef2_psnr(n=32, size=out.profile.image_size, root=root, seed=seed)
out.csv(tp, 'taef2_psnr')
fig, ax = plt.subplots(figsize=(5, 3))
sns.boxplot(tp, x='size', y='psnr', ax=ax, color='#9ecae1'); sns.stripplot(tp, x='size', y='psnr', ax=ax, color='k', size=3)
ax.set_title(f"TAEF2 round trip on {tp.id.nunique()} ISIC 2018 test images\n"
             + ', '.join(f"{k}: {v:.1f} dB" for k, v in tp.groupby('size').psnr.mean().items()))
ax.set_ylabel('PSNR (dB)'); out.png(fig, 'taef2_psnr')
tp.groupby('size').psnr.describe().round(2)

# %% [markdown]
# ## Pixel vs TAEF2 latent space at equal CPU time
#
# Both models: same data (ISIC 2018 + 2019 training splits), concept captions and MiniLM text conditioning; EMA
# snapshots at fixed steps placed so that the pixel twin's two points and the latent model's first two fall at about
# the same CPU minutes (the plots use the measured minutes). The latent model then trains on to its full length.
# FID/KID against held-out test images, sampled with the captions of those images (DDIM 20 steps, guidance 2). The
# grey line is two sets of real images at the same n: the floor of FID at this small n. The right panel shows what
# the CPU time buys in images seen.

# %%
if quick:
    res = backbone_comparison(profile, root, seed, device=device)
    table = res['table']; out.csv(table, 'fid_kid_vs_time')
    curves = pd.concat([pd.read_csv(p/'loss.csv').assign(model=k) for k, p in res['runs'].items()])
    states = {k: json.loads((p/'train_state.json').read_text()) for k, p in res['runs'].items()}
    out.csv(curves, 'loss_curves')
    out.csv(pd.DataFrame([{'model': k, **{c: v for c, v in s.items() if c != 'config'}} for k, s in states.items()]), 'training_runs')
    display(table.round(4))

# %%
if quick:
    fig, axs = plt.subplots(1, 4, figsize=(21, 3.8))
    sm = curves.assign(minutes=curves.elapsed_s / 60, loss=curves.groupby('model').loss.transform(lambda s: s.rolling(10, min_periods=1).mean()))
    sns.lineplot(sm, x='minutes', y='loss', hue='model', ax=axs[0]); axs[0].set_title('training loss (rolling mean of 10 logs)')
    gen, real = table[table.step > 0], table[table.step == 0].iloc[0]
    for ax, m, x in zip(axs[1:], ('fid', 'kid', 'fid'), ('minutes', 'minutes', 'images_seen')):
        sns.lineplot(gen, x=x, y=m, hue='model', marker='o', ax=ax)
        ax.axhline(real[m], color='grey', ls='--', label='real vs real'); ax.legend(fontsize=8)
        ax.set_title(f"{m.upper()} vs {'training time' if x == 'minutes' else 'images seen'} (n={int(real.n)})")
        ax.set_xlabel('training minutes (CPU)' if x == 'minutes' else 'training images seen (log scale)')
    axs[3].set_xscale('log')
    for k, s in states.items(): print(f"{k}: {s['step']} steps, {s['images_per_s']} images/s, {s['train_s'] / 60:.1f} min training, "
                                      f"{s['prep_s'] / 60:.1f} min data preparation (cached after the first run)")
    fig.tight_layout(); out.png(fig, 'loss_fid_kid_vs_time')

# %% [markdown]
# Samples of the final models, conditioned on the captions of the first held-out images shown on the left.

# %%
if quick:
    S, caps = res['samples'], res['captions']
    finals = {k: max((int(n.split('/')[1]), n) for n in S if n.startswith(k + '/'))[1] for k in res['runs']}
    k = 6
    ims = [S['real'][i] for i in range(k)] + [S[finals[m]][i] for m in res['runs'] for i in range(k)]
    titles = [c.replace('dermoscopy of ', '')[:40] for c in caps[:k]] + [f"{m} step {finals[m].split('/')[1]}" for m in res['runs'] for _ in range(k)]
    fig = image_grid(ims, titles=titles, ncols=k, size=2.2, suptitle='held-out real images (top) and samples for their captions')
    out.png(fig, 'samples')

# %% [markdown]
# ## DDIM inversion of real test images with the base model
#
# Invert with each image's caption and sample back with the same number of steps. The AE round trip is the ceiling
# for a latent model: its PSNR is the first column.

# %%
bb = load_base_model(profile, root, seed, device=device)
test = base_dataset(bb.image_size, 'test', root, seed)
idx = torch.randperm(len(test), generator=torch.Generator().manual_seed(seed))[:8].tolist()
x = torch.stack([test[i]['image'] for i in idx]).to(bb.device); caps = [test[i]['caption'] for i in idx]
inv, recs = inversion_error(bb, x, caps, steps=(10, 20, 50))
out.csv(inv, 'inversion_error')
summary = inv.groupby('steps')[['psnr_vs_image', 'psnr_vs_ae_roundtrip', 'latent_rel_mse']].mean()
display(summary.round(3))

# %%
cols = [('original', x.cpu(), None), ('AE round trip', recs['ae_roundtrip'], 0)] + [(f'DDIM {s} steps', recs[s], s) for s in (10, 20, 50)]
k = 4
ims = [c[1][i] for i in range(k) for c in cols]
titles = [name if s is None else f"{name}\n{inv[(inv.steps == s) & (inv.image == i)].psnr_vs_image.item():.1f} dB"
          for i in range(k) for name, _, s in cols]
fig = image_grid(ims, titles=titles, ncols=len(cols), size=2.2,
                 suptitle='DDIM inversion + reconstruction (PSNR vs the original)')
out.png(fig, 'inversion')
