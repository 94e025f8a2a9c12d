# %% [markdown]
# # LesionGen: concept-guided text-to-image synthesis, and classifiers trained on its images
#
# Reproduces the claims of *LesionGen* on real data in the profile's setting: concept-rich captions with provenance
# (expert, crowd, predicted by a concept classifier trained on expert annotations, measured from the lesion mask), a
# LoRA on the shared base model trained on them against one trained on label-only captions (the paper's ablation), and
# the paper's claim measured with one classifier architecture trained on real, synthetic and mixed images. Faithfulness
# is judged by the concept classifier, which never saw a caption, and distance to real images by FID per class.
# Every number below is computed here; the design choices that are ours (the authors' captioner, subgroups and numbers
# are not public) are stated in `nbs/07_lesiongen.ipynb`.

# %% tags=["parameters"]
profile = 'quick'
data_root = None
seed = 0
device = 'auto'
out_dir = 'figures/lesiongen'

# %%
import time
import numpy as np, pandas as pd, seaborn as sns, matplotlib.pyplot as plt, torch
from dermnb.core import image_grid
from dermnb.data import get_split, DermDataset
from dermnb.base import generate
from dermnb.dermclip import load_dermclip, dermclip_config
from dermnb.segmenter import load_segmenter, predict_proba, SegmenterConfig
from dermnb.lesiongen import (CONCEPTS, CLASSES, CLASS_GROUPS, CaptionConfig, load_concept_classifier, concept_classifier_table,
                              caption_dataset, caption_records, plot_caption_table, load_concept_dermclip, zero_shot_concepts,
                              load_lesiongen, lesiongen_train_config, lesiongen_prompt, record_features, lite0_features,
                              class_prompts, classifier_arms, subgroups, concept_faithfulness, faithfulness_summary, real_concept_rates, fid_per_class)
from dermnb.runner import figure_setup
out = figure_setup(profile, data_root, seed, device, out_dir)
root = out.root
S = {'quick': dict(n_arm=600, seeds=(0, 1, 2), m_faith=24, n_fid=64, guidance=(2., 4., 7.5), steps=(10, 20), n_sweep=64, m_sweep=8),
     'full': dict(n_arm=4000, seeds=(0, 1, 2), m_faith=100, n_fid=500, guidance=(3., 5., 7.5, 10.), steps=(30, 50, 70, 100),
                  n_sweep=500, m_sweep=50)}[out.profile.name]
times, t0 = [], time.time()
def lap(what):
    global t0
    times.append({'step': what, 'seconds': round(time.time() - t0, 1)}); t0 = time.time()


# %% [markdown]
# ## The concept classifier (our stand-in for GPT-4o's reports)
#
# Held-out AUROC and balanced accuracy per concept on the Derm7pt + PH2 test splits; the caption threshold is the
# confidence a predicted phrase needs to enter a caption.

# %%
clf = load_concept_classifier(root=root)
ctab = concept_classifier_table(clf, root)
out.csv(ctab, 'concept_classifier'); lap('concept classifier')
ctab.round(3)

# %% [markdown]
# ## Captions with provenance

# %%
ccfg = CaptionConfig()
rows = caption_dataset(ccfg, root, device)
prov = pd.DataFrame([{'source': r['source'], 'provenance': p['source']} for r in rows for p in r['phrases']])
ptab = prov.groupby(['source', 'provenance']).size().unstack(fill_value=0)
ptab['captions'] = pd.Series({s: sum(r['source'] == s for r in rows) for s in ptab.index})
ptab['mean_tokens'] = pd.Series({s: np.mean([r['tokens'] for r in rows if r['source'] == s]) for s in ptab.index})
out.csv(ptab.reset_index(), 'caption_provenance')
show = [next(r for r in rows if r['source'] == s and len(r['phrases']) > 3) for s in ('derm7pt', 'ph2', 'isic2018_task1', 'isic2019')]
show += [next(r for r in rows if any(p['source'] == 'predicted' for p in r['phrases']))]
out.png(plot_caption_table(show, root=root), 'caption_table')
out.csv(pd.DataFrame([{'id': r['id'], 'source': r['source'], 'caption': r['caption'], 'label_caption': r['label_caption'],
                       'phrases': '; '.join(f"{p['text']} [{p['source']}]" for p in r['phrases'])} for r in show]), 'caption_examples')
lap('captions'); ptab

# %% [markdown]
# ## A concept-aware DermCLIP: zero-shot concept detection on held-out Derm7pt

# %%
d7_test = get_split('derm7pt', 'test', root)
clips = {'DermCLIP (concept captions)': load_dermclip(dermclip_config(profile), root=root, log=None),
         'DermCLIP (LesionGen captions)': load_concept_dermclip(profile, root, log=None)}
zs = pd.concat([zero_shot_concepts(c, d7_test).assign(model=k) for k, c in clips.items()], ignore_index=True)
out.csv(zs, 'dermclip_concept_auroc')
fig, ax = plt.subplots(figsize=(9, 3.2))
sns.barplot(zs, x='concept', y='auroc', hue='model', ax=ax); ax.axhline(.5, color='k', lw=.8, ls='--')
ax.set_title(f'Zero-shot concept detection, Derm7pt test (n={len(d7_test)})'); ax.tick_params(axis='x', rotation=25)
out.png(fig, 'dermclip_concept_auroc'); lap('concept-aware DermCLIP')
zs.pivot(index='concept', columns='model', values='auroc').round(3)

# %% [markdown]
# ## The two LoRAs of the ablation

# %%
models = {k: load_lesiongen(profile, k, root, device) for k in ('rich', 'label')}
import json
runs = pd.DataFrame([{'captions': k, **{c: json.loads((m.cache_dir/'train_state.json').read_text())[c] for c in ('step', 'train_s', 'prep_s', 'images_per_s', 'final_loss')},
                      'config': lesiongen_train_config(profile, k).hash()} for k, m in models.items()])
out.csv(runs, 'training_runs'); lap('LoRAs'); runs

# %% [markdown]
# ## Generated images per diagnosis and per concept

# %%
g = S['guidance'][1]
dx_prompts = [lesiongen_prompt(c if c != 'other' else 'basal cell carcinoma') for c in CLASSES for _ in range(4)]
for k, m in models.items():
    im = generate(m, dx_prompts, g, 20, seed=seed)
    out.png(image_grid(list(im), titles=[p.replace('dermoscopy of ', '') for p in dx_prompts], ncols=8, size=1.5,
                       suptitle=f'LesionGen ({k} captions): one row per diagnosis'), f'grid_diagnosis_{k}')
cprompts = [lesiongen_prompt('melanoma', [c]) for c in CONCEPTS for _ in range(4)]
im = generate(models['rich'], cprompts, g, 20, seed=seed)
out.png(image_grid(list(im), titles=[c for c in CONCEPTS for _ in range(4)], ncols=8, size=1.5,
                   suptitle='LesionGen (rich captions): melanoma prompted with each concept'), 'grid_concepts')
lap('grids')

# %% [markdown]
# ## The paper's claim: classifiers on real, synthetic and mixed images
#
# ISIC 2019 classes (rare ones grouped as "other"); real training images from the ISIC 2019 training split, synthetic
# ones from the rich LoRA, class-balanced; every arm scored on the ISIC 2019 test split. Each arm's L2 strength C is
# chosen on the real ISIC 2019 validation split (column `C`): with one fixed C for all arms, a comparison between
# arms partly measures which arm that C happens to suit (at C = 0.05, real-only scored below what it reaches at its
# own best C). The mixed arms also choose, on the same validation split, how much a synthetic image counts against a
# real one (`syn_weight`, from 1 down to 0.1): synthetic images that are easier than real ones should not outvote them.

# %%
i19_train = [r for r in get_split('isic2019', 'train', root) if CLASS_GROUPS.get(r.diagnosis)]
i19_test = [r for r in get_split('isic2019', 'test', root) if CLASS_GROUPS.get(r.diagnosis)]
i19_val = [r for r in get_split('isic2019', 'val', root) if CLASS_GROUPS.get(r.diagnosis)]
real_X, test_X, val_X = (record_features(r).numpy() for r in (i19_train, i19_test, i19_val))
val_y = np.array([CLASSES.index(CLASS_GROUPS[r.diagnosis]) for r in i19_val])
real_y = np.array([CLASSES.index(CLASS_GROUPS[r.diagnosis]) for r in i19_train]); test_y = np.array([CLASSES.index(CLASS_GROUPS[r.diagnosis]) for r in i19_test])
syn_X, syn_y = {}, {}
for s in S['seeds']:
    pr = class_prompts(rows, S['n_arm'] // len(CLASSES) + 1, 'rich', seed=s)
    prompts = [p for c in CLASSES for p in pr[c]]; syn_y[s] = np.array([i for i, c in enumerate(CLASSES) for _ in pr[c]])
    syn_X[s] = lite0_features(generate(models['rich'], prompts, g, 20, seed=1000 * s)).numpy()
net = load_segmenter(SegmenterConfig.for_profile(profile), root, device)
from dermnb.core import load_image
test_masks = {r.id: p > .5 for r, p in zip(i19_test, predict_proba(net, [load_image(r.image) for r in i19_test]))}
groups = subgroups(i19_test, test_masks)
arms = classifier_arms(real_X, real_y, syn_X, syn_y, test_X, test_y, groups, n=S['n_arm'], seeds=S['seeds'], val=(val_X, val_y),
                       syn_weights=(1., .5, .25, .1))
out.csv(arms, 'classifier_arms')
summary = arms.groupby('arm', sort=False)[['accuracy', 'balanced_accuracy', 'worst subgroup']].agg(['mean', 'std'])
summary.columns = [' '.join(c) for c in summary.columns]; summary = summary.reset_index()
summary['n_train'] = arms.groupby('arm', sort=False).n_train.first().values; summary['n_test'] = len(test_y); summary['seeds'] = len(S['seeds'])
out.csv(summary, 'classifier_summary')
fig, axs = plt.subplots(1, 2, figsize=(10, 3.4))
for ax, mcol in zip(axs, ('balanced_accuracy', 'worst subgroup')):
    sns.barplot(arms, x='arm', y=mcol, ax=ax, errorbar='sd', color='#9ecae1'); sns.stripplot(arms, x='arm', y=mcol, ax=ax, color='k', size=4)
    ax.set_title(f"{mcol.replace('_', ' ')} on ISIC 2019 test (n={len(test_y)}; {len(S['seeds'])} seeds)"); ax.set_xlabel('')
out.png(fig, 'classifier_arms'); lap('classifier arms')
summary.round(3)

# %% [markdown]
# Worst subgroup per attribute (mean over seeds), and which group it is.

# %%
wcols = [f'worst {a}' for a in groups.columns if f'worst {a}' in arms.columns]   # one per attribute ('age group' ends in 'group' too)
worst = arms.groupby('arm', sort=False)[wcols].mean().round(3)
for c in wcols: worst[c + ' group'] = arms.groupby('arm', sort=False)[c + ' group'].agg(lambda s: s.mode().iloc[0])
out.csv(worst.reset_index(), 'worst_subgroups'); worst

# %% [markdown]
# ## Concept faithfulness: rich vs label-only captions, judged by the concept classifier
#
# Each concept is prompted in `m_faith` images and left out of as many, from the same starting noise (see
# `concept_faithfulness`): the left panel is the detection rate when prompted (black bars: the judge's rate on real
# test images with the concept), the right one the lift the concept words cause over their pairs (± 1 SE).

# %%
faith = pd.concat([concept_faithfulness(m, clf, S['m_faith'], g, 20, seed).assign(captions=k) for k, m in models.items()], ignore_index=True)
real_rates = real_concept_rates(clf, root)
faith = faith.merge(real_rates, on='concept')
out.csv(faith, 'concept_faithfulness')
fig, axs = plt.subplots(1, 2, figsize=(13, 3.4))
sns.barplot(faith, x='concept', y='prompted_rate', hue='captions', ax=axs[0])
axs[0].scatter(range(len(real_rates)), real_rates.real_with_rate, color='k', marker='_', s=300, zorder=3, label='real images with the concept')
axs[0].set_title(f"Detection rate of the prompted concept (m={S['m_faith']} per concept)"); axs[0].legend(fontsize=7)
sns.barplot(faith, x='concept', y='lift', hue='captions', ax=axs[1])
for i, k in enumerate(('rich', 'label')):
    f_ = faith[faith.captions == k]; axs[1].errorbar(np.arange(len(f_)) + (i - .5) * .4, f_.lift, f_.lift_se, fmt='none', color='k', lw=1)
axs[1].axhline(0, color='k', lw=.8); axs[1].set_title('Lift: prompted − unprompted detection, paired noise (± SE)')
for ax in axs: ax.tick_params(axis='x', rotation=25); ax.set_xlabel('')
out.png(fig, 'concept_faithfulness'); lap('faithfulness')
fsum = faithfulness_summary(faith)
out.csv(fsum.reset_index(), 'concept_faithfulness_summary'); fsum.round(3)

# %% [markdown]
# ## FID per class against real ISIC 2019 test images

# %%
real_by_class = {c: DermDataset([r for r in i19_test if CLASS_GROUPS[r.diagnosis] == c][:S['n_fid']], 64, 'squash', with_mask=False).images_uint8().float() / 127.5 - 1
                 for c in CLASSES}
from dermnb.metrics import inception_features
real_feats = {c: inception_features((x + 1) / 2, device=device) for c, x in real_by_class.items()}   # once, for both models and the sweep
fid = pd.concat([fid_per_class(m, class_prompts(rows, S['n_fid'], k, seed), real_feats, g, 20, seed, device).assign(captions=k)
                 for k, m in models.items()], ignore_index=True)
out.csv(fid, 'fid_per_class')
fig, ax = plt.subplots(figsize=(8, 3.2)); sns.barplot(fid, x='class', y='fid', hue='captions', ax=ax)
ax.set_title('FID per class (n per class in the CSV)'); out.png(fig, 'fid_per_class'); lap('FID per class')
fid.pivot(index='class', columns='captions', values='fid').round(1)

# %% [markdown]
# ## Guidance × steps (rich captions)
#
# FID of a mix of all classes' prompts (n generated in the CSV) against the real test images of every class (`n_real`),
# with the concept detection rate and lift at `m_sweep` pairs per concept.

# %%
mix = class_prompts(rows, S['n_sweep'] // len(CLASSES) + 1, 'rich', seed + 7)
sweep_prompts = [p for c in CLASSES for p in mix[c]][:S['n_sweep']]
from dermnb.base import fid_kid
real_mix_feats = np.concatenate([real_feats[c] for c in CLASSES])      # every class (n in fid_per_class.csv), as the prompts mix them
sw = []
for gs in S['guidance']:
    for st in S['steps']:
        f = fid_kid(real_mix_feats, generate(models['rich'], sweep_prompts, gs, st, seed=seed), device, seed)
        cf = concept_faithfulness(models['rich'], clf, S['m_sweep'], gs, st, seed)
        sw.append({'guidance': gs, 'steps': st, **f, 'concept_rate': cf.prompted_rate.mean(), 'concept_rate_unprompted': cf.unprompted_rate.mean(),
                   'concept_lift': cf.lift.mean(), 'n_real': len(real_mix_feats)})
sw = pd.DataFrame(sw); out.csv(sw, 'guidance_steps_sweep')
fig, axs = plt.subplots(1, 3, figsize=(13, 3.2))
for ax, v in zip(axs, ('fid', 'concept_rate', 'concept_lift')):
    sns.heatmap(sw.pivot(index='guidance', columns='steps', values=v), annot=True, fmt='.2f' if v != 'fid' else '.0f', ax=ax, cmap='viridis')
    ax.set_title(v.replace('_', ' '))
out.png(fig, 'guidance_steps_sweep'); lap('sweep')
out.csv(pd.DataFrame(times), 'timings'); sw.round(3)
