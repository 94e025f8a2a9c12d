# %% [markdown]
# # LesionGen
#
# > Concept-rich captions with provenance, concept-guided text-to-image LoRA on the shared base model, and the
# > paper's claim measured: classifiers trained on synthetic images, concept faithfulness and FID per class.
#
# Seed paper: *LesionGen: A Concept-Guided Diffusion Model for Dermatology Image Synthesis* (MICCAI 2025 ISIC
# workshop). The authors' public code (jfayyad/LesionGen) fine-tunes Stable Diffusion 1.4 with diffusers'
# `train_text_to_image_lora.py` (256 px, LoRA rank 64, lr 5e-6, batch 1 × accumulation 4, 15k steps) on HAM10000
# pseudo-reports written by GPT-4o, and prompts it with "{diagnosis} {small|medium|large} size on a {light|medium|dark}
# skin tone" at guidance {3, 5, 7.5, 10} and {30, 50, 70, 100} steps. Its Derm7pt captioner, its worst-subgroup
# definition and its numbers are not public: what follows is **our design**, and each choice says so.
#
# Everything generic comes from earlier notebooks: captions, provenance and measured morphology (`dermnb.captions`),
# the base model (`dermnb.base`), LoRA and the trainer (`dermnb.diffusion`, `dermnb.training`), DermCLIP
# (`dermnb.dermclip`), the U-Net for masks (`dermnb.segmenter`) and FID (`dermnb.metrics`). This notebook adds what is
# new in the paper: a concept classifier that stands in for GPT-4o's reports, the caption dataset, the two LoRAs of the
# ablation, and the evaluation of the claim.

# %%
#| default_exp lesiongen

# %%
#| export
from __future__ import annotations
import json, time, warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence
import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from dermnb.core import (Config, DermnbError, DataError, cached_dir, get_profile, seed_everything, load_image, load_mask,
                         save_json, atomic_save, atomic_write, channels_last, get_device, stable_hash, CPU_BATCH)
from dermnb.pretrained import load_effnet_lite0
from dermnb.data import Record, get_split, DermDataset, fit_square, LABELS, array_cache_key
from dermnb.captions import (Phrase, caption_phrases, fit_caption, label_caption, lesion_morphology, size_bin, tone_bin,
                             with_article, diagnosis_phrase, CAPTION_MAX_TOKENS, _and)

# %%
import tempfile
from collections import Counter
from fastcore.test import test_eq, test_ne, test_fail, test_close
from dermnb.core import data_root
torch.set_num_threads(2)
ROOT = data_root()

# %% [markdown]
# ## The concepts
#
# The seven criteria of the 7-point checklist, as Derm7pt annotates them, made binary in the direction that matters
# clinically (an *atypical* network, *irregular* dots and globules and pigmentation; the presence of streaks, a
# blue-whitish veil, regression structures and vessels). PH2's experts rate five of them in their own vocabulary;
# `concept_labels` maps both onto the same seven bits, None where a dataset does not rate a concept. The phrases are what
# captions and prompts say.

# %%
#| export
EXPERT_SOURCES = ('derm7pt', 'ph2')   # datasets whose experts rate the concepts
CONCEPTS = {   # concept -> (phrase, Derm7pt rule, PH2 rule); a rule maps the dataset's value to 1/0
    'atypical_pigment_network': ('an atypical pigment network', lambda c: c.get('pigment_network') == 'atypical',
                                 lambda c: c.get('pigment_network') == 'atypical'),
    'streaks': ('streaks', lambda c: c.get('streaks') in ('regular', 'irregular'), lambda c: c.get('streaks') == 'present'),
    'irregular_dots_globules': ('irregular dots and globules', lambda c: c.get('dots_and_globules') == 'irregular',
                                lambda c: c.get('dots_globules') == 'atypical'),
    'blue_whitish_veil': ('a blue-whitish veil', lambda c: c.get('blue_whitish_veil') == 'present',
                          lambda c: c.get('blue_whitish_veil') == 'present'),
    'regression_structures': ('regression structures', lambda c: c.get('regression_structures', 'absent') != 'absent',
                              lambda c: c.get('regression_areas') == 'present'),
    'irregular_pigmentation': ('irregular pigmentation', lambda c: 'irregular' in str(c.get('pigmentation', '')), None),
    'vascular_structures': ('vessels', lambda c: c.get('vascular_structures', 'absent') != 'absent', None),
}


# %%
#| export
def concept_labels(rec:Record # a Derm7pt or PH2 record (others have no expert concepts)
                  )->dict:
    "The seven binary concepts of a record: 1, 0, or None where its dataset does not rate the concept."
    out = {}
    for k, (_, d7, ph2) in CONCEPTS.items():
        rule = d7 if rec.source == 'derm7pt' else ph2 if rec.source == 'ph2' else None
        out[k] = int(rule(rec.concepts)) if rule is not None and rec.concepts else None
    return out


# %%
d7, ph2 = get_split('derm7pt', None, ROOT), get_split('ph2', None, ROOT)
lab7 = pd.DataFrame([concept_labels(r) for r in d7]); labp = pd.DataFrame([concept_labels(r) for r in ph2])
test_eq(int(lab7.streaks.sum()), sum(r.concepts['streaks'] != 'absent' for r in d7))
test_eq(int(labp.blue_whitish_veil.sum()), sum(r.concepts['blue_whitish_veil'] == 'present' for r in ph2))
assert labp.vascular_structures.isna().all() and not lab7.isna().any().any()
test_eq(concept_labels(get_split('isic2019', 'test', ROOT)[0]), {k: None for k in CONCEPTS})
pd.concat([lab7.sum().rename('Derm7pt'), labp.sum().rename('PH2')], axis=1)


# %% [markdown]
# ## Image features
#
# The concept classifier reads frozen ImageNet EfficientNet-Lite0 features: the pooled 1280-d output of its head
# convolution, averaged over a flip. Images take the path that generated images take: squashed to the generator's
# 64 px, then upsampled to the network's 128 px, so real and generated images are read at the same resolution (a
# classifier trained at a sharper resolution would see generated images as "blurry", not as "without streaks").
# `lite0_features` embeds a tensor batch; `record_features` embeds records, cached by their file list.

# %%
#| export
@torch.no_grad()
def lite0_features(images:torch.Tensor, # (N, 3, S, S) in [-1, 1], any S (resized to `size`)
                   size:int=128, # network input side
                   net:nn.Module|None=None, # a Lite0 from `load_effnet_lite0` (default: loaded once)
                   batch_size:int=CPU_BATCH # images per forward pass
                  )->torch.Tensor:
    "Pooled 1280-d EfficientNet-Lite0 features (ImageNet, frozen), averaged over the image and its mirror."
    net = net or _lite0()
    out = []
    for b in images.split(batch_size):
        x = F.interpolate(b.float(), size=(size, size), mode='bilinear', align_corners=False, antialias=True)
        f = sum(net.extract_features(channels_last(v)).mean((2, 3)) for v in (x, x.flip(-1))) / 2
        out.append(f.cpu())
    return torch.cat(out) if out else torch.zeros(0, 1280)

_LITE0 = {}
def _lite0():
    if 'net' not in _LITE0: _LITE0['net'] = load_effnet_lite0().eval()
    return _LITE0['net']


# %%
#| export
def record_features(records:Sequence[Record], # records to embed
                    from_size:int=64, # the generator's resolution the images pass through
                    size:int=128 # network input side
                   )->torch.Tensor:
    "`lite0_features` of records' images squashed to `from_size`, cached by the file list (paths, sizes, mtimes)."
    key = {'files': [[str(r.image), r.image.stat().st_size, r.image.stat().st_mtime_ns] for r in records],
           'from_size': from_size, 'size': size, 'fit': 'squash', 'net': 'effnet-lite0-imagenet-pooled-flip2'}
    def build(d):
        x = DermDataset(records, from_size, 'squash', with_mask=False).images_uint8().float() / 127.5 - 1
        torch.save(lite0_features(x, size), d/'features.pt')
    return torch.load(cached_dir('lite0-features', key, build)/'features.pt')


# %%
f8 = record_features(d7[:8])
test_eq(f8.shape, (8, 1280)); assert f8.std(0).mean() > 0.01            # image-dependent
test_eq(record_features(d7[:8]), f8)                                  # the cache returns the same features
x2 = DermDataset(d7[:2], 64, 'squash', with_mask=False).images_uint8().float() / 127.5 - 1
test_close(lite0_features(x2), f8[:2], eps=1e-4)


# %% [markdown]
# ## The concept classifier (our answer to GPT-4o's reports)
#
# The authors caption HAM10000 with reports that GPT-4o wrote from each image. We cannot call GPT-4o, and its reports
# cannot be checked; instead a classifier trained on expert annotations predicts the concepts, with a held-out score
# per concept and a confidence for every phrase it writes. One balanced logistic regression per concept on the
# standardised features (reduced to `pca_dims` whitened principal components: on the 1280-d features the fits were
# many times slower for the same out-of-fold AUROC), fitted on the Derm7pt + PH2 **train and validation** splits (PH2 only for the five concepts it
# rates); the **test** splits stay untouched for the table below.
#
# The validation splits alone are small (109 images), and thresholds chosen on them swung widely, so every choice is
# made on 5-fold out-of-fold predictions over train + validation: the regularisation C (by out-of-fold AUROC, from
# `Cs`), the *decision* threshold (maximal out-of-fold balanced accuracy; detection rates and balanced accuracy use
# it), and the *caption* threshold, the lowest probability at which out-of-fold precision reaches `caption_precision`
# (the decision threshold when none does). A predicted phrase enters a caption only above its caption threshold.

# %%
#| export
@dataclass(frozen=True)
class ConceptClassifierConfig(Config):
    "What determines the concept classifier (hashed for the cache)."
    datasets:tuple=EXPERT_SOURCES       # expert-annotated training data (their train splits)
    from_size:int=64                    # images pass through the generator's resolution
    size:int=128                        # Lite0 input side
    pca_dims:int=64                     # the standardised features are reduced to this many whitened components first
    Cs:tuple=(0.003, 0.01, 0.03, 0.1)   # inverse L2 strengths tried per concept (chosen by out-of-fold AUROC)
    folds:int=5                         # cross-validation folds over train + val
    caption_precision:float=0.7         # out-of-fold precision a predicted phrase needs
    seed:int=0                          # seed of the folds
    split_seed:int=0                    # seed of dermnb.data splits


# %%
#| export
def _concept_xy(cfg:ConceptClassifierConfig, split:str, root=None)->tuple:
    recs = [r for ds in cfg.datasets for r in get_split(ds, split, root, cfg.split_seed)]
    return recs, record_features(recs, cfg.from_size, cfg.size).numpy(), pd.DataFrame([concept_labels(r) for r in recs])

def _threshold(y, p, cap_prec)->tuple:
    "(decision threshold maximising balanced accuracy, caption threshold reaching `cap_prec` precision)."
    cands = np.unique(np.r_[p, .5])
    bal = [((p[y == 1] >= t).mean() + (p[y == 0] < t).mean()) / 2 for t in cands]
    dec = float(cands[int(np.argmax(bal))])
    prec = [(y[p >= t] == 1).mean() if (p >= t).any() else 0 for t in cands]
    ok = [t for t, q in zip(cands, prec) if q >= cap_prec and (p >= t).sum() >= 5]
    return dec, float(min(ok)) if ok else dec

def _oof(X, y, C, folds, seed)->np.ndarray:
    "Out-of-fold probabilities of a balanced logistic regression (stratified folds)."
    from sklearn.model_selection import StratifiedKFold
    p = np.zeros(len(y))
    for tr, te in StratifiedKFold(folds, shuffle=True, random_state=seed).split(X, y):
        p[te] = LogisticRegression(C=C, class_weight='balanced', max_iter=3000).fit(X[tr], y[tr]).predict_proba(X[te])[:, 1]
    return p


# %%
#| export
class ConceptClassifier:
    "Seven logistic heads on frozen Lite0 features, with per-concept decision and caption thresholds."
    def __init__(self, cfg:ConceptClassifierConfig, # its config
                 heads:dict, # concept -> fitted LogisticRegression
                 reduce, # fitted sklearn transform: features (N, 1280) -> the heads' inputs
                 thresholds:dict # concept -> {'decision', 'caption', ...}
                ):
        self.cfg, self.heads, self.reduce, self.thresholds = cfg, heads, reduce, thresholds

    def predict_features(self, feats:np.ndarray|torch.Tensor)->pd.DataFrame:
        "Probability of each concept (columns) for Lite0 feature rows."
        z = self.reduce.transform(np.asarray(feats, np.float64))
        return pd.DataFrame({k: h.predict_proba(z)[:, 1] for k, h in self.heads.items()})

    def predict_images(self, images:torch.Tensor # (N, 3, S, S) in [-1, 1]
                      )->pd.DataFrame:
        "Concept probabilities of image tensors (generated images, say), read like the training images."
        x = F.interpolate(images.float(), size=(self.cfg.from_size,) * 2, mode='bilinear', antialias=True) if images.shape[-1] != self.cfg.from_size else images
        return self.predict_features(lite0_features(x, self.cfg.size))


# %%
#| export
def train_concept_classifier(cfg:ConceptClassifierConfig=ConceptClassifierConfig(), # what to train
                             root:str|Path|None=None # data root
                            )->ConceptClassifier:
    "Fit the seven heads on train + val, with C and thresholds chosen on out-of-fold predictions."
    _, Xtr, Ytr = _concept_xy(cfg, 'train', root); _, Xva, Yva = _concept_xy(cfg, 'val', root)
    from sklearn.decomposition import PCA
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    X, Y = np.concatenate([Xtr, Xva]), pd.concat([Ytr, Yva], ignore_index=True)
    reduce = make_pipeline(StandardScaler(), PCA(cfg.pca_dims, whiten=True, random_state=cfg.seed)).fit(X)
    Z = reduce.transform(X)
    heads, thr = {}, {}
    for k in CONCEPTS:
        m = Y[k].notna().to_numpy(); y = Y[k][m].astype(int).to_numpy()
        oof = {C: _oof(Z[m], y, C, cfg.folds, cfg.seed) for C in cfg.Cs}
        C = max(cfg.Cs, key=lambda c: roc_auc_score(y, oof[c]))
        dec, cap = _threshold(y, oof[C], cfg.caption_precision)
        heads[k] = LogisticRegression(C=C, class_weight='balanced', max_iter=3000).fit(Z[m], y)
        thr[k] = {'decision': dec, 'caption': cap, 'C': C, 'oof_auroc': float(roc_auc_score(y, oof[C]))}
    return ConceptClassifier(cfg, heads, reduce, thr)


# %% [markdown]
# The classifier is cached by its config (a pickle of the fitted sklearn heads and thresholds next to the config), so
# captions, prompts and the figure all use one. The pickle holds no dermnb class: a classifier trained while this
# notebook runs (its classes then live in `__main__`) must load in the package too.

# %%
#| export
def load_concept_classifier(cfg:ConceptClassifierConfig=ConceptClassifierConfig(), # the config
                            root:str|Path|None=None # data root (training on a cache miss)
                           )->ConceptClassifier:
    "The trained concept classifier of a config, from the cache or trained on a miss."
    import pickle
    def build(d):
        c = train_concept_classifier(cfg, root)
        state = {'heads': c.heads, 'reduce': c.reduce, 'thresholds': c.thresholds}   # sklearn parts only: no dermnb class
        atomic_save(d/'classifier.pkl', lambda t: t.write_bytes(pickle.dumps(state)))
    state = pickle.loads((cached_dir('concept-classifier-v2', cfg, build)/'classifier.pkl').read_bytes())
    return ConceptClassifier(cfg, state['heads'], state['reduce'], state['thresholds'])


# %% [markdown]
# Its held-out quality, per concept, on the Derm7pt + PH2 **test** splits: AUROC, and balanced accuracy at the decision
# threshold, with the number of positives.

# %%
#| export
def concept_classifier_table(clf:ConceptClassifier, # a trained concept classifier
                             root:str|Path|None=None, # data root
                             split:str='test' # held-out split
                            )->pd.DataFrame:
    "Per concept: n, positives, AUROC, balanced accuracy at the decision threshold, and both thresholds."
    _, X, Y = _concept_xy(clf.cfg, split, root); P = clf.predict_features(X); rows = []
    for k in CONCEPTS:
        m = Y[k].notna().to_numpy(); y, p = Y[k][m].astype(int).to_numpy(), P[k][m].to_numpy(); t = clf.thresholds[k]
        bal = ((p[y == 1] >= t['decision']).mean() + (p[y == 0] < t['decision']).mean()) / 2
        rows.append({'concept': k, 'n': int(m.sum()), 'positives': int(y.sum()), 'auroc': roc_auc_score(y, p),
                     'balanced_accuracy': bal, 'decision_threshold': t['decision'], 'caption_threshold': t['caption'],
                     'caption_precision_target': clf.cfg.caption_precision, 'C': t['C'], 'oof_auroc_trainval': t['oof_auroc']})
    return pd.DataFrame(rows)


# %%
clf = load_concept_classifier(root=ROOT)
ctab = concept_classifier_table(clf, ROOT)
print(ctab.round(3).to_string())
assert (ctab.auroc > .6).all(), ctab                                   # better than chance on every concept
assert ctab.set_index('concept').loc['blue_whitish_veil', 'auroc'] > .75
from dermnb.core import cached_dir as _cd
_pk = (_cd('concept-classifier-v2', clf.cfg, None)/'classifier.pkl').read_bytes()
assert b'__main__' not in _pk and b'dermnb' not in _pk                 # loadable outside this notebook

# %% [markdown]
# ## The caption dataset
#
# Every record gets concept-rich captions with provenance (`dermnb.captions`): the label, expert and crowd concepts,
# concepts the classifier predicts above their caption threshold (for records without expert concepts: ISIC 2018 and
# 2019), morphology measured from the record's mask (the ground truth where the dataset has masks, ISIC 2018 and PH2,
# else the project's U-Net: Derm7pt and ISIC 2019; the row says which), and site, age and sex. `variants` seeds give
# different template wordings of the same phrases (the trainer draws one per step); the label-only caption is kept
# beside them for the ablation. The dataset is cached as JSONL, keyed by its config.

# %%
#| export
CAPTION_DATASETS = ('isic2018_task1', 'isic2019', 'ph2', 'derm7pt')

@dataclass(frozen=True)
class CaptionConfig(Config):
    "What a caption dataset depends on (hashed for the cache)."
    datasets:tuple=CAPTION_DATASETS     # datasets to caption
    splits:tuple=('train',)             # their splits
    variants:int=3                      # template wordings per record (seeds 0..variants-1)
    max_tokens:int=CAPTION_MAX_TOKENS   # the text encoder's token limit
    classifier:str=ConceptClassifierConfig().hash()   # the concept classifier's config hash
    segmenter:str='quick'               # profile of the U-Net that masks records without a ground-truth mask
    split_seed:int=0                    # seed of dermnb.data splits
    caption_version:int=1               # bump when the captioner's wording changes


# %%
#| export
def _unet_masks(recs:Sequence[Record], profile:str, root, device)->dict:
    "U-Net masks (at each image's size) for records without a ground-truth mask."
    todo = [r for r in recs if r.mask is None]
    if not todo: return {}
    from dermnb.segmenter import load_segmenter, predict_proba, SegmenterConfig
    net = load_segmenter(SegmenterConfig.for_profile(profile), root, device)
    out = {}
    for i in range(0, len(todo), 64):
        ch = todo[i:i + 64]
        for r, p in zip(ch, predict_proba(net, [load_image(r.image) for r in ch])): out[r.id] = p > .5
    return out

def caption_rows(records:Sequence[Record], # records to caption
                 clf:ConceptClassifier, # predicts concepts for records without expert concepts
                 masks:dict, # record id -> U-Net mask, for records without a ground-truth mask
                 variants:int=3, # template wordings per record
                 max_tokens:int=CAPTION_MAX_TOKENS # token limit
                )->list:
    "One JSON-able row per record: captions (variants), label caption, phrases with provenance, mask source, measures."
    feats = record_features(records, clf.cfg.from_size, clf.cfg.size)
    probs = clf.predict_features(feats)
    rows = []
    for i, r in enumerate(records):
        img = load_image(r.image)
        m, src = (load_mask(r.mask, size=img.size), 'ground truth') if r.mask is not None else (masks.get(r.id), 'U-Net')
        meas = lesion_morphology(img, m) if m is not None and m.any() else None
        if meas is None: src = 'none'
        expert = r.source in EXPERT_SOURCES
        pred = [] if expert else [Phrase(CONCEPTS[k][0], 'concept', 'predicted', k, round(float(probs[k][i]), 3))
                                  for k in CONCEPTS if probs[k][i] >= clf.thresholds[k]['caption']]
        ph = caption_phrases(r, pred, meas)
        caps = [fit_caption(r, ph, seed=s, max_tokens=max_tokens) for s in range(variants)]
        rows.append({'id': r.id, 'source': r.source, 'split': r.meta.get('split'), 'diagnosis': r.diagnosis,
                     'caption': caps[0]['caption'], 'captions': [c['caption'] for c in caps], 'label_caption': label_caption(r),
                     'phrases': caps[0]['phrases'], 'dropped': caps[0]['dropped'], 'tokens': caps[0]['tokens'],
                     'mask': src, 'morphology': {k: v for k, v in (meas or {}).items() if k != 'colour_shares'},
                     'predicted': {k: round(float(probs[k][i]), 3) for k in CONCEPTS}})
    return rows


# %%
#| export
def caption_dataset(cfg:CaptionConfig=CaptionConfig(), # which records, how many wordings
                    root:str|Path|None=None, # data root
                    device:str='auto', # for the U-Net
                    progress:bool=True # a bar per dataset
                   )->list:
    "The caption dataset of a config (rows of `caption_rows`), built and cached as JSONL on first use."
    def build(d):
        clf = load_concept_classifier(ConceptClassifierConfig(), root)
        if clf.cfg.hash() != cfg.classifier: raise DermnbError(f"caption config names classifier {cfg.classifier}, the default is {clf.cfg.hash()}")
        rows = []
        for ds in tqdm(cfg.datasets, desc='caption', disable=not progress, leave=False):
            with warnings.catch_warnings():
                warnings.simplefilter('ignore')
                recs = [r for sp in cfg.splits for r in get_split(ds, sp, root, cfg.split_seed)]
            rows += caption_rows(recs, clf, _unet_masks(recs, cfg.segmenter, root, device), cfg.variants, cfg.max_tokens)
        with atomic_write(d/'captions.jsonl', 'w') as f:
            for row in rows: f.write(json.dumps(row) + '\n')
    p = cached_dir('captions', cfg, build)/'captions.jsonl'
    return [json.loads(l) for l in p.read_text().splitlines()]


# %% [markdown]
# On a few real records of each dataset: captions fit the token limit, every phrase carries a provenance, records of
# Derm7pt and PH2 say what their experts said, ISIC records carry predicted concepts with confidences above their
# thresholds, masks come from the ground truth or the U-Net as stated, and the wording changes across variants.

# %%
with tempfile.TemporaryDirectory() as d:
    import os; os.environ['DERMNB_CACHE'] = d
    try:
        few = [r for ds in CAPTION_DATASETS for r in get_split(ds, 'train', ROOT)[:6]]
        from dermnb.segmenter import SegmenterConfig, load_segmenter
        tiny_seg = SegmenterConfig(size=64, epochs=1, batch_size=8, max_images=16, width=8)
        masks = {r.id: p > .5 for r, p in zip([r for r in few if r.mask is None],
                 __import__('dermnb.segmenter', fromlist=['predict_proba']).predict_proba(load_segmenter(tiny_seg, ROOT, 'cpu'),
                 [load_image(r.image) for r in few if r.mask is None]))}
        rows = caption_rows(few, clf, masks, variants=3)
    finally: del os.environ['DERMNB_CACHE']
test_eq(len(rows), len(few)); assert all(r['tokens'] <= CAPTION_MAX_TOKENS for r in rows)
assert all(p['source'] in ('label', 'expert', 'crowd', 'predicted', 'measured', 'metadata') for r in rows for p in r['phrases'])
test_eq({r['source']: r['mask'] for r in rows if r['mask'] != 'none'}.get('isic2018_task1'), 'ground truth')
assert {r['mask'] for r in rows if r['source'] == 'derm7pt'} <= {'U-Net', 'none'}
assert any(p['source'] == 'expert' for r in rows if r['source'] == 'derm7pt' for p in r['phrases'])
for r in rows:
    for p in r['phrases']:
        if p['source'] == 'predicted': assert p['confidence'] >= clf.thresholds[p['key']]['caption']
assert any(len(set(r['captions'])) > 1 for r in rows)
pd.DataFrame(rows)[['source', 'mask', 'tokens', 'caption']].head(8)

# %% [markdown]
# ## Text-to-image LoRA on the shared base model
#
# **quick:** LoRA adapters (peft, rank `LORA_RANK`) on the attention projections of the cached quick base model,
# trained with the project's trainer on the caption dataset's images (64 px, squashed, both flips) with their
# concept-rich captions (one of the wordings drawn per step) or their label-only captions: the paper's ablation, same
# images, steps and seed. The base model's text encoder (MiniLM, frozen) already separates concept words; the LoRA on
# the cross-attention keys and values learns to read them (the text side is not fine-tuned: see the faithfulness
# results for whether that sufficed). Rank 16 at this UNet's width (128) is a larger share of the model than the
# authors' rank 64 on SD 1.4's 320–1280; we keep their ratio of adapter to steps rather than the number.
#
# **full:** Stable Diffusion 1.4 (the authors' choice) with their settings: 256 px, rank 64, lr 5e-6, batch 1 ×
# accumulation 4, 15k steps, fp16 on a GPU.

# %%
#| export
LORA_RANK = 16              # quick profile LoRA rank
LORA_STEPS = 600            # quick profile optimizer steps (batch 32)
CAPTION_KINDS = ('rich', 'label')

def lesiongen_train_config(profile:str='quick', # run profile
                           captions:str='rich', # 'rich' (concept-rich, with provenance) or 'label' (label-only)
                           caption_cfg:CaptionConfig=CaptionConfig(), # the caption dataset
                           seed:int=0, # seed of the adapter, data order and noise
                           expert_repeat:int=1 # times the expert-annotated images appear in the training set (`lora_rows`)
                          )->'TrainConfig':
    "The LoRA training config of LesionGen for a profile and a caption kind."
    from dermnb.training import TrainConfig
    from dermnb.base import base_config
    if captions not in CAPTION_KINDS: raise DermnbError(f"captions must be one of {CAPTION_KINDS}, not {captions!r}")
    p = get_profile(profile); data = f'lesiongen-{captions}:{caption_cfg.hash()}:lora_rows300{f"x{expert_repeat}expert" if expert_repeat != 1 else ""}:squash'
    if p.name == 'quick':
        return TrainConfig(data=data, space='latent', ae='taef2', image_size=p.image_size, cond='text', text_encoder='minilm',
                           base=f'cached:{base_config(profile, 0).hash()}', lora_rank=LORA_RANK, lora_alpha=LORA_RANK,
                           prediction_type='v_prediction', steps=LORA_STEPS, batch_size=32, lr=3e-4, warmup=50, ema_decay=0.99,
                           p_uncond=0.1, flip=True, max_minutes=3 * p.train_minutes, ckpt_every=200, log_every=10, seed=seed)
    return TrainConfig(data=data.replace(':squash', ':256'), space='latent', ae='sd:CompVis/stable-diffusion-v1-4', image_size=256,
                       cond='text', base='sd:CompVis/stable-diffusion-v1-4', lora_rank=64, lora_alpha=64, steps=15000,
                       batch_size=1, grad_accum=4, lr=5e-6, warmup=0, lr_schedule='constant', ema_decay=0., p_uncond=0.,
                       mixed_precision='fp16', ckpt_every=2500, seed=seed)


# %%
from dermnb.base import base_config
cfg_rich, cfg_label = lesiongen_train_config('quick', 'rich'), lesiongen_train_config('quick', 'label')
test_eq({k for k, v in cfg_rich.to_dict().items() if v != cfg_label.to_dict()[k]}, {'data'})   # the ablation differs in the captions only
assert cfg_rich.base == f"cached:{base_config('quick').hash()}" and cfg_rich.lora_rank == LORA_RANK
test_fail(lambda: lesiongen_train_config('quick', 'gpt4o'), contains='rich')
test_eq(lesiongen_train_config('quick', 'rich', expert_repeat=3).replace(data=cfg_rich.data), cfg_rich)   # only the data name changes
assert 'x3expert' in lesiongen_train_config('quick', 'rich', expert_repeat=3).data


# %% [markdown]
# The training set is the caption dataset's records with masks or not (the images only are used), each with its
# captions: all wordings for `rich`, the label caption for `label`.

# %%
#| export
def caption_records(rows:Sequence[dict], # caption dataset rows
                    root:str|Path|None=None, # data root
                    seed:int=0 # split seed
                   )->list:
    "The `Record`s of caption rows (in row order)."
    by = {}
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        for ds in sorted({r['source'] for r in rows}): by.update({(ds, x.id): x for x in get_split(ds, None, root, seed)})
    return [by[(r['source'], r['id'])] for r in rows]

def lesiongen_dataset(rows:Sequence[dict], # caption dataset rows
                      captions:str='rich', # 'rich' or 'label'
                      image_size:int=64, # training image side
                      root:str|Path|None=None # data root
                     ):
    "A training dataset of the rows' images (squashed) with their rich (all wordings) or label-only captions."
    caps = {(r['source'], r['id']): (r['captions'] if captions == 'rich' else r['label_caption']) for r in rows}
    recs = caption_records(rows, root)
    ds = DermDataset(recs, image_size, 'squash', caption_fn=lambda rec: caps[(rec.source, rec.id)], with_mask=False)
    ds.images_key = stable_hash(array_cache_key(ds.records, ds.size, ds.fit, False, ds.draft))   # its pixels: both caption kinds share latents
    return ds


# %%
few_ds = lesiongen_dataset(rows[:4], 'rich', 16, ROOT)
it = few_ds[0]; test_eq(it['image'].shape, (3, 16, 16)); test_eq(it['caption'], rows[0]['captions'])
test_eq(lesiongen_dataset(rows[:4], 'label', 16, ROOT)[0]['caption'], rows[0]['label_caption'])
test_eq(lesiongen_dataset(rows[:4], 'label', 16, ROOT).images_key, few_ds.images_key)   # same pixels, same key (see prepare_data)
test_ne(lesiongen_dataset(rows[:3], 'rich', 16, ROOT).images_key, few_ds.images_key)


# %% [markdown]
# The LoRA's training set keeps every expert-annotated image (PH2, Derm7pt) and every ISIC 2018 image, and at most
# `per_class` ISIC 2019 images per diagnosis (all of the rare classes; nevi are 72% of ISIC 2019 and the base model has
# seen them all): the quick profile's data preparation (one TAEF2 encoding per image and flip) then fits its budget,
# and the adapter sees the rare classes it must generate for the classifier experiment as often as the common ones.

# %%
#| export
def lora_rows(rows:Sequence[dict], # caption dataset rows
              per_class:int=300, # ISIC 2019 images kept per diagnosis
              seed:int=0, # which ones
              expert_repeat:int=1 # how many times the expert-annotated rows (Derm7pt, PH2) appear
             )->list:
    "The caption rows LesionGen's LoRA trains on (expert datasets and ISIC 2018 in full, ISIC 2019 capped per class)."
    if expert_repeat < 1: raise DermnbError(f"expert_repeat must be at least 1, not {expert_repeat}")
    rng = np.random.default_rng(seed); keep = [r for r in rows if r['source'] != 'isic2019']
    for dx in sorted({r['diagnosis'] or '' for r in rows if r['source'] == 'isic2019'}):
        pool = [r for r in rows if r['source'] == 'isic2019' and (r['diagnosis'] or '') == dx]
        keep += [pool[i] for i in sorted(rng.permutation(len(pool))[:per_class])]
    return keep + [r for r in keep if r['source'] in EXPERT_SOURCES] * (expert_repeat - 1)


# %%
lr_ = lora_rows([{'source': 'isic2019', 'diagnosis': 'nevus', 'id': str(i)} for i in range(10)] + [{'source': 'ph2', 'diagnosis': 'nevus', 'id': 'p'}], per_class=3)
test_eq((len(lr_), sum(r['source'] == 'isic2019' for r in lr_)), (4, 3))
lr3_ = lora_rows([{'source': 'isic2019', 'diagnosis': 'nevus', 'id': str(i)} for i in range(10)] + [{'source': 'ph2', 'diagnosis': 'nevus', 'id': 'p'}], per_class=3, expert_repeat=3)
test_eq(lr3_[:4], lr_); test_eq([r['id'] for r in lr3_[4:]], ['p', 'p'])   # the expert row twice more, the rest unchanged
test_fail(lambda: lora_rows(lr_, expert_repeat=0), contains='at least 1')


# %% [markdown]
# `load_lesiongen` trains the LoRA through the cache on a miss (progress shown) and returns the base model with the
# adapter loaded, ready to sample.

# %%
#| export
def load_lesiongen(profile:str='quick', # run profile
                   captions:str='rich', # 'rich' or 'label'
                   root:str|Path|None=None, # data root
                   device:str='auto', # device
                   seed:int=0, # LoRA seed
                   caption_cfg:CaptionConfig=CaptionConfig(), # the caption dataset
                   progress:bool=True, # training progress bars
                   expert_repeat:int=1 # times the expert-annotated images appear in the training set
                  ):
    "LesionGen's backbone (base + LoRA trained on the chosen captions), trained and cached on first use."
    from dermnb.training import train_cached, load_trained
    from dermnb.base import load_base_model
    cfg = lesiongen_train_config(profile, captions, caption_cfg, seed, expert_repeat)
    if cfg.base.startswith('cached:'): load_base_model(profile, root, 0, device, progress)     # the base must be in the cache
    rows = lambda: lora_rows(caption_dataset(caption_cfg, root, device, progress), expert_repeat=expert_repeat)
    path = train_cached(cfg, lambda: lesiongen_dataset(rows(), captions, cfg.image_size, root), device=device, progress=progress)
    bb = load_trained(path, device); bb.cache_dir = path
    return bb


# %% [markdown]
# ## Prompts
#
# Prompts follow the captions' grammar (`render_caption`): "dermoscopy of {diagnosis} with {concepts} and a {size}
# lesion, on {tone} skin" (the authors' "{diagnosis} {size} size on a {tone} skin tone", in the words our captions use). `lesiongen_prompt`
# builds one; `check_prompt` parses a free-text prompt and warns about concept words outside the vocabulary the model
# was trained with (listing it), and an empty prompt is an error.

# %%
#| export
SIZES, TONES = ('small', 'medium', 'large'), ('light', 'medium', 'dark')

def lesiongen_prompt(diagnosis:str, # e.g. 'melanoma', 'nevus', 'basal cell carcinoma'
                     concepts:Sequence[str]=(), # keys of CONCEPTS or their phrases
                     size:str|None=None, # 'small', 'medium' or 'large'
                     tone:str|None=None # 'light', 'medium' or 'dark'
                    )->str:
    "A generation prompt in the captions' grammar."
    if not diagnosis or not diagnosis.strip(): raise DermnbError("lesiongen_prompt needs a diagnosis")
    ph = [CONCEPTS[c][0] if c in CONCEPTS else c for c in concepts]
    if size is not None and size not in SIZES: raise DermnbError(f"size must be one of {SIZES}, not {size!r}")
    if tone is not None and tone not in TONES: raise DermnbError(f"tone must be one of {TONES}, not {tone!r}")
    if size: ph.append(f"a {'medium-sized' if size == 'medium' else size} lesion")
    s = f"dermoscopy of {with_article(diagnosis.replace('_', ' '))}" + (f" with {_and(ph)}" if ph else '')
    return s + (f', on {tone} skin' if tone else '')


# %%
#| export
def prompt_vocabulary(rows:Sequence[dict]=()  # caption rows whose phrases count as known (besides CONCEPTS and sizes)
                     )->list:
    "The concept phrases a LesionGen model was trained with."
    v = {p for p, *_ in CONCEPTS.values()} | {f"a {'medium-sized' if s == 'medium' else s} lesion" for s in SIZES}
    v |= {p['text'] for r in rows for p in r['phrases'] if p['kind'] in ('concept', 'morphology')}
    return sorted(v)

def check_prompt(prompt:str, # a free-text generation prompt
                 vocabulary:Sequence[str]|None=None # known phrases; default `prompt_vocabulary()`
                )->list:
    "Raise on an empty prompt; warn (listing the vocabulary) about concept phrases the model never saw; returns them."
    if not prompt or not prompt.strip(): raise DermnbError("empty prompt: say what to generate, e.g. " + repr(lesiongen_prompt('melanoma', ['streaks'])))
    vocab = set(vocabulary or prompt_vocabulary())
    body = prompt.split(' with ', 1)[1] if ' with ' in prompt else ''
    body = body.split(', on ')[0].split(', in ')[0]
    frags = [f.strip() for part in body.split(',') for f in part.split(' and ') if f.strip()]
    unknown = [f for f in frags if f not in vocab and not any(f in v for v in vocab)]
    if unknown: warnings.warn(f"concept words outside the training vocabulary: {unknown}; known: {sorted(vocab)}")
    return unknown


# %%
test_eq(lesiongen_prompt('melanoma', ['streaks', 'blue_whitish_veil'], 'large', 'dark'),
        'dermoscopy of a melanoma with streaks, a blue-whitish veil and a large lesion, on dark skin')
test_eq(lesiongen_prompt('basal_cell_carcinoma'), 'dermoscopy of a basal cell carcinoma')
test_fail(lambda: lesiongen_prompt(''), contains='diagnosis'); test_fail(lambda: lesiongen_prompt('nevus', size='huge'), contains='small')
test_fail(lambda: check_prompt('  '), contains='empty prompt')
test_eq(check_prompt(lesiongen_prompt('melanoma', ['streaks'], 'small')), [])
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter('always'); unk = check_prompt('dermoscopy of a melanoma with sparkly dots and streaks')
test_eq(unk, ['sparkly dots']); assert 'known:' in str(w[-1].message) and 'a blue-whitish veil' in str(w[-1].message)

# %% [markdown]
# ## The paper's claim: classifiers trained on synthetic images
#
# **Our protocol** (the authors' evaluation is not public). One architecture for every arm: EfficientNet-Lite0 with
# its ImageNet weights, frozen, read as the concept classifier reads images (64 px through 128 px, flip-averaged
# pooled features), and a balanced multinomial logistic regression on top. A frozen network with a trained linear
# head keeps 3 arms × 3 seeds inside the CPU budget; the comparison between arms is what it measures. Classes: the
# ISIC 2019 (HAM10000) diagnoses, with the four rare ones (actinic keratosis, dermatofibroma, vascular lesion,
# squamous cell carcinoma; fewer than 120 images each here) grouped as "other". Arms, each with `n` training images:
#
# - **real-only**: `n` ISIC 2019 training images drawn at random (the natural class mix);
# - **synthetic-only**: `n` generated images, class-balanced, each prompted with the concept-rich caption of a random
#   training image of its class (so the concepts follow each class's real distribution);
# - **real + synthetic**: `n/2` of each (the equal-count arm the targets are judged on);
# - **real + synthetic (added)**: the `n` real images of real-only plus `n` synthetic ones, `2n` in all: how
#   synthetic images are used as augmentation in practice. It is reported beside the equal-count arm, not instead of it;
# - **real-only (half)**: the `n/2` real images of the equal-count arm alone, so that the table shows what its
#   synthetic half buys over leaving it out, as well as what it costs against real images in its place.
#
# Every arm is scored on the same real ISIC 2019 test split. Seeds change the real draw, the prompts and noise, and
# the classifier's solver.

# %%
#| export
CLASS_GROUPS = {'melanoma': 'melanoma', 'nevus': 'nevus', 'benign_keratosis': 'benign keratosis',
                'basal_cell_carcinoma': 'basal cell carcinoma', 'actinic_keratosis': 'other', 'dermatofibroma': 'other',
                'vascular_lesion': 'other', 'squamous_cell_carcinoma': 'other'}
CLASSES = ('melanoma', 'nevus', 'benign keratosis', 'basal cell carcinoma', 'other')


# %%
#| export
def fit_linear_head(X:np.ndarray, # features (N, 1280)
                    y:np.ndarray, # class indices
                    seed:int=0, # solver seed
                    C:float=0.05, # inverse L2 strength
                    sample_weight:np.ndarray|None=None # per-image weights (e.g. synthetic images down-weighted)
                   ):
    "A balanced multinomial logistic regression on standardised features (the classifier of every arm)."
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    return make_pipeline(StandardScaler(), LogisticRegression(C=C, class_weight='balanced', max_iter=3000, random_state=seed)).fit(
        X, y, logisticregression__sample_weight=sample_weight)


# %%
#| export
def _balacc(y, p)->float:
    cls = np.unique(y); return float(np.mean([(p[y == c] == c).mean() for c in cls])) if len(cls) else float('nan')

AGE_BINS = ((0, 30, '<30'), (30, 50, '30-49'), (50, 70, '50-69'), (70, 200, '70+'))

def subgroup_table(y:np.ndarray, # true class indices
                   p:np.ndarray, # predicted class indices
                   groups:pd.DataFrame, # one column per attribute (sex, age group, site, skin tone), one row per image
                   min_n:int=20 # groups smaller than this are not scored
                  )->pd.DataFrame:
    "Balanced accuracy per group of every attribute (groups with at least `min_n` images and two classes)."
    rows = []
    for a in groups.columns:
        for g, idx in groups.groupby(a).groups.items():
            idx = np.asarray([groups.index.get_loc(i) for i in idx])
            if len(idx) < min_n or len(np.unique(y[idx])) < 2: continue
            rows.append({'attribute': a, 'group': g, 'n': len(idx), 'balanced_accuracy': _balacc(y[idx], p[idx])})
    return pd.DataFrame(rows)


# %%
yy_ = np.array([0, 0, 1, 1, 0, 1]); pp_ = np.array([0, 1, 1, 1, 0, 0])
test_close(_balacc(yy_, pp_), (2/3 + 2/3) / 2)
st_ = subgroup_table(yy_, pp_, pd.DataFrame({'sex': ['m', 'm', 'm', 'f', 'f', 'f']}), min_n=3)
test_eq(st_.group.tolist(), ['f', 'm']); test_close(st_.set_index('group').balanced_accuracy['m'], .75)


# %% [markdown]
# The attributes of the worst-subgroup score, for the test images: sex and age group from the ISIC 2019 metadata (age
# bins `AGE_BINS`), anatomical site, and the *measured* imaged skin tone (ITA° of the skin around the U-Net's lesion
# mask, binned by `dermnb.captions.tone_bin`).

# %%
#| export
def subgroups(records:Sequence[Record], # test records (ISIC 2019)
              masks:dict # record id -> lesion mask (for the skin tone)
             )->pd.DataFrame:
    "Sex, age group, site and measured skin tone of each record (None where unknown)."
    def age(a):
        if a is None or (isinstance(a, float) and np.isnan(a)): return None
        return next(lab for lo, hi, lab in AGE_BINS if lo <= a < hi)
    rows = []
    for r in records:
        m = masks.get(r.id); tone = None
        if m is not None and m.any(): tone = tone_bin(lesion_morphology(load_image(r.image), m)['ita'])
        rows.append({'sex': r.meta.get('sex'), 'age group': age(r.meta.get('age')), 'site': r.meta.get('site'), 'skin tone': tone})
    return pd.DataFrame(rows)


# %%
#| export
def fit_arm_head(X:np.ndarray, # an arm's training features
                 y:np.ndarray, # its class indices
                 is_syn:np.ndarray, # which of its images are synthetic (bool)
                 val:tuple, # (features, classes) of the real validation split
                 seed:int=0, # solver seed
                 Cs:Sequence[float]=(0.003, 0.01, 0.03, 0.05), # inverse L2 strengths tried
                 syn_weights:Sequence[float]=(1.,) # synthetic-image weights tried (mixed arms only)
                )->tuple:
    "(classifier, C, synthetic weight) of an arm: the pair with the best validation balanced accuracy."
    ws = syn_weights if 0 < is_syn.sum() < len(is_syn) else (1.,)
    fits = [(fit_linear_head(X, y, seed, C, np.where(is_syn, w, 1.)), C, w) for C in Cs for w in ws]
    return max(fits, key=lambda f: _balacc(val[1], f[0].predict(val[0])))


# %%
#| export
def classifier_arms(real_X:np.ndarray, # features of the real training pool
                    real_y:np.ndarray, # its class indices
                    syn_X:dict, # seed -> features of that seed's synthetic pool (class-balanced, at least n)
                    syn_y:dict, # seed -> its class indices
                    test_X:np.ndarray, # test features
                    test_y:np.ndarray, # test class indices
                    groups:pd.DataFrame, # `subgroups` of the test records
                    n:int=600, # training images per arm
                    seeds:Sequence[int]=(0, 1, 2), # repetitions
                    val:tuple|None=None, # (features, classes) of a real validation split: each arm's C is chosen on it
                    Cs:Sequence[float]=(0.003, 0.01, 0.03, 0.05), # inverse L2 strengths tried on `val`
                    syn_weights:Sequence[float]=(1.,) # weights of synthetic images tried on `val` in the mixed arms
                   )->pd.DataFrame:
    "Per arm and seed: accuracy, balanced accuracy, per-class recall, and the worst subgroup per attribute."
    def head(X, y, s, is_syn):
        "The arm's classifier: fixed C, or the (C, synthetic weight) with the best validation balanced accuracy."
        if val is None: return fit_linear_head(X, y, s), 0.05, 1.
        return fit_arm_head(X, y, is_syn, val, s, Cs, syn_weights)
    rows = []
    for s in seeds:
        rng = np.random.default_rng(s)
        ri = rng.permutation(len(real_X)); si = rng.permutation(len(syn_X[s]))
        real, syn = (real_X[ri[:n]], real_y[ri[:n]]), (syn_X[s][si[:n]], syn_y[s][si[:n]])
        mix = lambda k: tuple(np.concatenate([r[:k], q[:n - k] if k < n else q]) for r, q in zip(real, syn))
        arms = {'real-only': real, 'synthetic-only': syn, 'real + synthetic': mix(n // 2), 'real + synthetic (added)': mix(n),
                'real-only (half)': tuple(r[:n // 2] for r in real)}
        n_real = {'real-only': n, 'synthetic-only': 0, 'real + synthetic': n // 2, 'real + synthetic (added)': n, 'real-only (half)': n // 2}
        for arm, (X, y) in arms.items():
            m, C, w = head(X, y, s, np.arange(len(y)) >= n_real[arm]); p = m.predict(test_X)
            row = {'arm': arm, 'seed': s, 'n_train': len(y), 'C': C, 'syn_weight': w, 'accuracy': float((p == test_y).mean()), 'balanced_accuracy': _balacc(test_y, p)}
            row.update({f'recall {c}': float((p[test_y == i] == i).mean()) for i, c in enumerate(CLASSES) if (test_y == i).any()})
            sub = subgroup_table(test_y, p, groups)
            for a, g in sub.groupby('attribute'):
                w = g.loc[g.balanced_accuracy.idxmin()]
                row[f'worst {a}'] = w.balanced_accuracy; row[f'worst {a} group'] = w.group
            row['worst subgroup'] = float(sub.balanced_accuracy.min()) if len(sub) else float('nan')
            rows.append(row)
    return pd.DataFrame(rows)


# %%
g_ = np.random.default_rng(0)
Xr, yr = g_.normal(size=(120, 6)), np.repeat(np.arange(3), 40); Xr[:, 0] += yr * 2
Xs = {s: Xr + g_.normal(size=Xr.shape) * .1 for s in (0, 1)}; ys = {s: yr for s in (0, 1)}
grp = pd.DataFrame({'sex': ['male', 'female'] * 60})
arms_ = classifier_arms(Xr, yr, Xs, ys, Xr, yr, grp, n=60, seeds=(0, 1))
test_eq(sorted(arms_.arm.unique()), ['real + synthetic', 'real + synthetic (added)', 'real-only', 'real-only (half)', 'synthetic-only']); test_eq(len(arms_), 10)
test_eq(arms_.groupby('arm').n_train.first().to_dict(), {'real + synthetic': 60, 'real + synthetic (added)': 120, 'real-only': 60,
                                                        'real-only (half)': 30, 'synthetic-only': 60})
assert (arms_.balanced_accuracy > .6).all() and {'worst sex', 'worst sex group', 'worst subgroup'} <= set(arms_.columns)
Xv_, yv_ = Xr[::2] + g_.normal(size=(60, 6)), yr[::2]                # a noisier "validation split"
armv = classifier_arms(Xr, yr, Xs, ys, Xr, yr, grp, n=60, seeds=(0,), val=(Xv_, yv_), Cs=(1e-3, 1.))
test_eq(armv.columns[3], 'C'); assert set(armv.C) <= {1e-3, 1.}
rng_ = np.random.default_rng(0); ri_ = rng_.permutation(120)               # the real-only arm's draw, refitted at both Cs
va_ = {C: _balacc(yv_, fit_linear_head(Xr[ri_[:60]], yr[ri_[:60]], 0, C).predict(Xv_)) for C in (1e-3, 1.)}
test_eq(armv.set_index('arm').C['real-only'], max(va_, key=va_.get))   # the C with the better validation score
armw = classifier_arms(Xr, yr, Xs, ys, Xr, yr, grp, n=60, seeds=(0,), val=(Xv_, yv_), Cs=(1.,), syn_weights=(1., .1))
test_eq(armw.set_index('arm').syn_weight[['real-only', 'synthetic-only']].tolist(), [1., 1.])   # no synthetic weight to choose
assert set(armw.syn_weight) <= {1., .1}
coef_ = lambda w: fit_linear_head(Xr, yr, 0, 1., w)[-1].coef_
test_close(coef_(np.ones(120)), coef_(None), eps=1e-6)                      # unit weights = no weights
assert np.abs(coef_(np.r_[np.ones(60), np.full(60, .1)]) - coef_(None)).max() > 1e-3   # the weights do reach the fit

# %% [markdown]
# **Which synthetic pool?** Three ways to make the synthetic half worth more were measured on the real ISIC 2019
# *validation* split by `benchmarks/lesiongen_synthetic_variants.py` (the figure's pools, prompts and noise, 3 seeds;
# test is printed for the record only, the choice is made on validation):
#
# - the generation guidance: the figure's g = 4 against g = 2, which the sweep shows is closer to the real images by FID,
#   and against g = 6 and 8, which might separate the classes more;
# - filtering, which keeps the synthetic images that a classifier of the arm's own real images finds most typical of
#   their prompted class;
# - a LoRA trained twice as long (1200 steps).
#
# Filtering lowers validation accuracy at every setting (the most typical images add the least that the real ones do
# not already say). Lower guidance helps the mixed arm on validation and costs the synthetic-only arm; higher guidance
# costs the synthetic-only arm too, so on validation it peaks at the figure's g = 4 over the grid. The longer LoRA
# lowers both the synthetic-only and the mixed arm on validation (it raises the added arm). No setting beats the
# figure's mixed arm on validation by more than the seed spread, so the figure keeps its one pool (600 steps, g = 4)
# for every arm. The validation split is small (586 images, a few dozen in the rarer classes), and on test the longer
# LoRA's mixed arm does reach real-only; adopting it for that reason would be choosing on the test split, so it is
# reported here and not adopted.

# %%
from dermnb.core import results_csv
bench = results_csv('benchmarks/results/lesiongen_synthetic_variants.csv')
key_ = ['lora_steps', 'guidance', 'arm']
v_ = bench.groupby(key_).val_balanced_accuracy.mean(); sd_ = bench.groupby(key_).val_balanced_accuracy.std()   # the prose, checked
for st_, g_ in bench[['lora_steps', 'guidance']].drop_duplicates().itertuples(index=False):
    for a_ in ('real + synthetic', 'real + synthetic (added)'): assert v_[(st_, g_, a_ + ', filtered')] < v_[(st_, g_, a_)]
assert v_[(600, 2., 'real + synthetic')] > v_[(600, 4., 'real + synthetic')] and v_[(600, 2., 'synthetic-only')] < v_[(600, 4., 'synthetic-only')]
assert v_[(1200, 4., 'real + synthetic')] < v_[(600, 4., 'real + synthetic')] and v_[(1200, 4., 'synthetic-only')] < v_[(600, 4., 'synthetic-only')]
so_ = v_.xs((600, 'synthetic-only'), level=('lora_steps', 'arm')); test_eq(so_.idxmax(), 4.); assert len(so_) >= 4   # over g = 2, 4, 6, 8
assert v_[(1200, 4., 'real + synthetic (added)')] > v_[(600, 4., 'real + synthetic (added)')]
t_ = bench.groupby(key_).test_balanced_accuracy.mean(); assert t_[(1200, 4., 'real + synthetic')] >= t_[(1200, 4., 'real-only')]
best_ = v_.xs('real + synthetic', level='arm'); assert best_.max() - v_[(600, 4., 'real + synthetic')] < sd_.xs('real + synthetic', level='arm').max()
bench.groupby(key_, sort=False)[['val_balanced_accuracy', 'test_balanced_accuracy']].agg(['mean', 'std']).round(3)


# %% [markdown]
# ## Concept faithfulness
#
# Does prompting a concept put it in the image? Judged by the concept classifier, a model trained on real expert
# annotations only (not on any caption vocabulary, so the judge is not circular). For each concept, `m` images are
# generated from "dermoscopy of {diagnosis} with {concept}" (diagnoses alternating between melanoma and nevus) and
# `m` from the same prompts without the concept, **from the same starting noise** (DDIM with η = 0 is deterministic
# given it), so each pair differs only by the concept words. Two numbers per concept:
#
# - the **detection rate** when prompted (`prompted_rate`), set against the judge's rate on real test images that
#   have the concept (its recall) and those that do not;
# - the **lift**: prompted minus unprompted rate over the pairs, with its standard error from the paired
#   differences. A model that draws every concept into every image has a high detection rate and no lift; the
#   label-only model never saw a concept word (its base model's captions name none of the seven criteria; only
#   "vascular lesion" as a diagnosis), so its lift measures how far concept words move it by accident.
#
# Pairing the noise removes the image-to-image variation that dominates unpaired rates at small m (at m = 24 an
# unpaired rate has a standard error near 0.1 per concept). `prob_shift` is the mean change in the judge's
# probability, the same comparison without the threshold.

# %%
#| export
def concept_faithfulness(bb, # a LesionGen backbone
                         clf:ConceptClassifier, # the judge
                         m:int=24, # image pairs per concept
                         guidance_scale:float=4., # classifier-free guidance
                         steps:int=20, # DDIM steps
                         seed:int=0 # sampling seed (concept j uses seed + 1000 j for both prompts of a pair)
                        )->pd.DataFrame:
    "Per concept: detection rates with and without the concept prompted (paired noise), their lift and its SE."
    from dermnb.base import generate
    rows = []
    for j, k in enumerate(CONCEPTS):
        dx = ['melanoma' if i % 2 == 0 else 'nevus' for i in range(m)]
        p_with, p_without = (clf.predict_images(generate(bb, [lesiongen_prompt(d, c) for d in dx], guidance_scale, steps,
                                                         seed=seed + 1000 * j))[k].to_numpy() for c in ([k], []))
        t = clf.thresholds[k]['decision']; a, b = p_with >= t, p_without >= t; d = a.astype(float) - b
        rows.append({'concept': k, 'prompted_rate': float(a.mean()), 'unprompted_rate': float(b.mean()), 'lift': float(d.mean()),
                     'lift_se': float(d.std(ddof=1) / np.sqrt(m)) if m > 1 else float('nan'), 'gained': float((a & ~b).mean()),
                     'lost': float((b & ~a).mean()), 'prob_shift': float((p_with - p_without).mean()), 'm': m})
    return pd.DataFrame(rows)


# %% [markdown]
# On a tiny model that ignores its text (an unconditional UNet behind the text interface) every pair is the same
# image twice, so the lift is exactly zero, whatever the judge says: the pairing holds.

# %%
from dermnb.diffusion import Backbone, make_unet, make_scheduler
class _IgnoresText(ConceptClassifier):
    def __init__(self): self.thresholds = {k: {'decision': .5} for k in CONCEPTS}
    def predict_images(self, images): return pd.DataFrame({k: (images.mean((1, 2, 3)) + 1).numpy() / 2 for k in CONCEPTS})
bb_u = Backbone(make_unet('none', sample_size=8, block_out_channels=(8, 8), head_dim=8), make_scheduler(), image_size=8)
cf_ = concept_faithfulness(bb_u, _IgnoresText(), m=4, steps=2)
test_eq(cf_.lift.tolist(), [0.] * len(CONCEPTS)); test_eq(cf_.prob_shift.tolist(), [0.] * len(CONCEPTS))
test_eq(cf_.prompted_rate.tolist(), cf_.unprompted_rate.tolist()); test_eq(set(cf_.m), {4})


# %% [markdown]
# `faithfulness_summary` averages a model's concepts: mean rates, lift and probability shift, and the standard error
# of the mean lift (the concepts' paired errors are independent).

# %%
#| export
def faithfulness_summary(faith:pd.DataFrame # `concept_faithfulness` rows with a 'captions' column
                        )->pd.DataFrame:
    "Per caption kind: mean prompted / unprompted rate, lift, probability shift, and the SE of the mean lift."
    g = faith.groupby('captions')
    out = g[['prompted_rate', 'unprompted_rate', 'lift', 'prob_shift']].mean()
    out['lift_se'] = g.lift_se.apply(lambda s: float(np.sqrt((s ** 2).sum())) / len(s))
    return out


# %%
fs_ = faithfulness_summary(pd.concat([cf_.assign(captions='x', lift=.1, lift_se=.2)]))
test_close(fs_.loc['x', 'lift'], .1); test_close(fs_.loc['x', 'lift_se'], .2 / np.sqrt(len(CONCEPTS)))

# %% [markdown]
# **Would the LoRA learn the concept words better if it saw the expert-annotated images more often?** The rare
# criteria (streaks, blue-whitish veil, vessels) pass the caption threshold in few ISIC captions, so most of their
# mentions come from Derm7pt and PH2, a quarter of the LoRA's training set. `benchmarks/lesiongen_faithfulness_variants.py`
# trains both LoRAs of the ablation with those images three times over (`expert_repeat`, everything else equal) and
# scores them with a sampling seed the figure does not use. Repetition lowers the rich LoRA's lift and raises the
# label-only LoRA's, which never saw a concept word: concept words move a model through what its text encoder makes
# of them, whether or not it was taught them. On these pairs the figure's LoRAs (repeat 1) differ by less than one
# standard error. Not adopted; the figure keeps repeat 1.

# %%
fv_ = results_csv('benchmarks/results/lesiongen_faithfulness_variants.csv')
fvs_ = {r: faithfulness_summary(g) for r, g in fv_.groupby('expert_repeat')}
assert fvs_[3].loc['rich', 'lift'] < fvs_[1].loc['rich', 'lift'] and fvs_[3].loc['label', 'lift'] > fvs_[1].loc['label', 'lift']
assert fvs_[3].loc['label', 'lift'] > fvs_[3].loc['rich', 'lift']
d_ = fvs_[1].loc['rich', 'lift'] - fvs_[1].loc['label', 'lift']; assert abs(d_) < np.hypot(*fvs_[1].lift_se)
pd.concat(fvs_, names=['expert_repeat']).round(3)


# %%
#| export
def real_concept_rates(clf:ConceptClassifier, # the judge
                       root:str|Path|None=None, # data root
                       split:str='test' # held-out split
                      )->pd.DataFrame:
    "The judge's detection rate on real held-out images with (recall) and without (false-positive rate) each concept."
    _, X, Y = _concept_xy(clf.cfg, split, root); P = clf.predict_features(X); rows = []
    for k in CONCEPTS:
        msk = Y[k].notna().to_numpy(); y = Y[k][msk].astype(int).to_numpy(); d = P[k][msk].to_numpy() >= clf.thresholds[k]['decision']
        rows.append({'concept': k, 'real_with_rate': float(d[y == 1].mean()), 'real_without_rate': float(d[y == 0].mean()),
                     'n_with': int(y.sum()), 'n_without': int((1 - y).sum())})
    return pd.DataFrame(rows)


# %% [markdown]
# ## FID per class, and the guidance × steps sweep
#
# FID (and KID) of generated images of each class against the real ISIC 2019 test images of that class, prompted with
# concept-rich captions of training images of the class (label-only captions for the label-only model); n is the
# smaller of `n` and the real images available, and it is stated per row (FID at small n is biased upwards, so only
# rows at the same n compare). The sweep scores the authors' generation grid, trimmed to what the quick profile
# affords, by FID over all classes and by mean concept faithfulness.

# %%
#| export
def class_prompts(rows:Sequence[dict], # caption dataset rows (training split)
                  n:int, # prompts per class
                  captions:str='rich', # 'rich' or 'label'
                  seed:int=0 # which training images' captions
                 )->dict:
    "Per class of `CLASSES`: `n` prompts, the captions of random training images of that class (ISIC 2019 rows)."
    rng = np.random.default_rng(seed); out = {}
    for c in CLASSES:
        pool = [r for r in rows if r['source'] == 'isic2019' and CLASS_GROUPS.get(r['diagnosis']) == c]
        pick = rng.choice(len(pool), n, replace=len(pool) < n)
        out[c] = [pool[i]['captions'][int(rng.integers(len(pool[i]['captions'])))] if captions == 'rich' else pool[i]['label_caption'] for i in pick]
    return out


# %%
#| export
def fid_per_class(bb, # a LesionGen backbone
                  prompts:dict, # class -> prompts (`class_prompts`)
                  real:dict, # class -> real images (N, 3, S, S) in [-1, 1], or their Inception features (N, 2048)
                  guidance_scale:float=4., # guidance
                  steps:int=20, # DDIM steps
                  seed:int=0, # sampling seed
                  device:str='auto' # Inception device
                 )->pd.DataFrame:
    "FID and KID of generated against real images, per class, at n = min(prompts, real images)."
    from dermnb.base import generate, fid_kid
    from dermnb.metrics import inception_features
    rows = []
    for j, c in enumerate(CLASSES):
        n = min(len(prompts[c]), len(real[c]))
        imgs = generate(bb, prompts[c][:n], guidance_scale, steps, seed=seed + 100 * j)
        rf = real[c][:n] if isinstance(real[c], np.ndarray) else inception_features((real[c][:n].float() + 1) / 2, device=device)
        rows.append({'class': c, **fid_kid(rf, imgs, device, seed)})
    return pd.DataFrame(rows)


# %% [markdown]
# ## A concept-aware DermCLIP
#
# CPDE's directional CLIP loss needs a CLIP that tells "with streaks" from "without". The project's DermCLIP trains on
# `dermnb.captions.concept_caption` captions; its concept-aware sibling trains on this caption dataset instead (per
# record: the first rich wording, the label-only caption, and two more wordings, so short prompts stay in its
# distribution), with every other setting equal (and the same cached image stems). Zero-shot concept detection scores
# an image by how much closer it is to "dermoscopy of a skin lesion with {concept}" than to "dermoscopy of a skin
# lesion" (template-averaged), and is reported as AUROC per criterion on the held-out Derm7pt test split.

# %%
#| export
def concept_dermclip_config(profile:str='quick', # run profile
                            caption_cfg:CaptionConfig=CaptionConfig() # the caption dataset it trains on
                           ):
    "The concept-aware DermCLIP's config: the profile's DermCLIP with LesionGen's captions."
    from dermnb.dermclip import dermclip_config
    return dermclip_config(profile, captions=f'lesiongen:{caption_cfg.hash()}')

def load_concept_dermclip(profile:str='quick', # run profile
                          root:str|Path|None=None, # data root
                          device:str='cpu', # device
                          caption_cfg:CaptionConfig=CaptionConfig(), # the caption dataset
                          log:Callable|None=None # progress callback
                         ):
    "The concept-aware DermCLIP (a `ClipEncoder`), trained on LesionGen's captions and cached on first use."
    from dermnb.dermclip import load_dermclip
    rows = caption_dataset(caption_cfg, root, device, progress=log is not None)
    table = {r['id']: [r['captions'][0], r['label_caption'], *r['captions'][1:3]] for r in rows}
    return load_dermclip(concept_dermclip_config(profile, caption_cfg), root=root, device=device, log=log, captions=table)


# %%
#| export
ZS_CONCEPT_TEMPLATES = ('dermoscopy of a skin lesion{}', 'a dermoscopic image of a skin lesion{}', 'dermoscopy of a lesion{}')

@torch.no_grad()
def zero_shot_concepts(clip, # a ClipEncoder (DermCLIP or any CLIP)
                       records:Sequence[Record], # Derm7pt / PH2 records with expert concepts
                       batch_size:int=CPU_BATCH # images per forward pass
                      )->pd.DataFrame:
    "Per concept: AUROC of the zero-shot score cos(img, 'with {concept}') - cos(img, plain), against the experts."
    emb = lambda suffix: F.normalize(clip.encode_text([t.format(suffix) for t in ZS_CONCEPT_TEMPLATES]).mean(0), dim=-1)
    x = DermDataset(records, clip.image_size, clip.fit, with_mask=False).images_uint8().float() / 127.5 - 1
    img = torch.cat([clip.encode_image(b).cpu() for b in x.split(batch_size)])
    labels = pd.DataFrame([concept_labels(r) for r in records]); plain = emb(''); rows = []
    for k, (phrase, *_) in CONCEPTS.items():
        s = (img @ (emb(f' with {phrase}') - plain).cpu()).numpy(); m = labels[k].notna().to_numpy()
        y = labels[k][m].astype(int).to_numpy()
        rows.append({'concept': k, 'n': int(m.sum()), 'positives': int(y.sum()), 'auroc': roc_auc_score(y, s[m]) if 0 < y.sum() < len(y) else float('nan')})
    return pd.DataFrame(rows)


# %%
from dermnb.clip import load_open_clip
import open_clip, json as _json
with tempfile.TemporaryDirectory() as d:
    TINY = {'embed_dim': 32, 'vision_cfg': {'image_size': 32, 'layers': 1, 'width': 32, 'patch_size': 8, 'head_width': 16},
            'text_cfg': {'context_length': 32, 'vocab_size': 49408, 'width': 32, 'heads': 2, 'layers': 1}}
    (Path(d)/'lg-tiny-clip.json').write_text(_json.dumps(TINY)); open_clip.add_model_config(d)
    zs = zero_shot_concepts(load_open_clip('lg-tiny-clip', 'random'), get_split('derm7pt', 'test', ROOT)[:40])
test_eq(zs.concept.tolist(), list(CONCEPTS)); assert zs.auroc.between(0, 1).all()      # a random CLIP: about chance
test_eq(concept_dermclip_config().captions, f'lesiongen:{CaptionConfig().hash()}')


# %% [markdown]
# The LoRA path end to end, shrunk to seconds: a tiny text-conditional latent model is saved, LoRA-tuned on a few real
# images with several rich wordings per image (the trainer draws one per step), and reloaded with its adapter; an
# empty prompt or n ≤ 0 is refused by `generate_lesiongen`, which writes images atomically.

# %%
#| export
def generate_lesiongen(bb, # a LesionGen backbone (`load_lesiongen`)
                       prompt:str, # the text prompt (see `lesiongen_prompt`)
                       n:int, # number of images
                       out_dir:str|Path|None=None, # write PNGs here (LG_<seed>_<i>.png), atomically
                       seed:int=0, # sampling seed
                       guidance_scale:float=4., # classifier-free guidance
                       steps:int=20, # DDIM steps
                       vocabulary:Sequence[str]|None=None # known concept phrases (warns about others)
                      )->torch.Tensor:
    "Generate n images for one prompt (checked against the vocabulary); optionally write them as PNGs."
    from dermnb.base import generate
    from dermnb.core import save_image
    if not isinstance(n, int) or n <= 0: raise DermnbError(f"n must be a positive number of images, not {n!r}")
    check_prompt(prompt, vocabulary)
    imgs = generate(bb, [prompt] * n, guidance_scale, steps, seed=seed)
    if out_dir is not None:
        for i, im in enumerate(imgs): save_image(im, Path(out_dir)/f'LG_{seed}_{i:05d}.png')
    return imgs


# %%
from dermnb.training import TrainConfig, train_cached, load_trained
from dermnb.diffusion import Backbone, make_unet, make_scheduler, load_taef2, load_text_encoder
with tempfile.TemporaryDirectory() as d:
    te = load_text_encoder('minilm')
    tiny_base = Backbone(make_unet('text', sample_size=2, in_channels=32, cross_attention_dim=384, block_out_channels=(32, 32),
                                   head_dim=16), make_scheduler(prediction_type='v_prediction'), load_taef2(), te, image_size=16)
    tiny_base.save(Path(d)/'base')
    cfg_t = TrainConfig(data='lesiongen-test', space='latent', image_size=16, cond='text', base=str(Path(d)/'base'), lora_rank=4,
                        prediction_type='v_prediction', steps=4, batch_size=4, lr=1e-3, warmup=1, log_every=1, ema_decay=0.)
    p_t = train_cached(cfg_t, lambda: lesiongen_dataset(rows[:8], 'rich', 16, ROOT), device='cpu', root=Path(d)/'cache', progress=False)
    lg = load_trained(p_t, 'cpu'); assert lg.unet.peft_config
    out = generate_lesiongen(lg, lesiongen_prompt('melanoma', ['streaks']), 2, Path(d)/'gen', steps=2)
    test_eq(out.shape, (2, 3, 16, 16)); test_eq(sorted(p.name for p in (Path(d)/'gen').iterdir()), ['LG_0_00000.png', 'LG_0_00001.png'])
    test_fail(lambda: generate_lesiongen(lg, '', 2), contains='empty prompt')
    test_fail(lambda: generate_lesiongen(lg, 'dermoscopy of a nevus', 0), contains='positive number')

# %% [markdown]
# ## Figures
#
# A caption table that shows where every phrase came from (colours by provenance, predicted phrases with their
# confidence), and grids of generated images per diagnosis and per concept.

# %%
#| export
PROVENANCE_COLOURS = {'label': '#222222', 'expert': '#1a9850', 'crowd': '#66bd63', 'predicted': '#f46d43',
                      'measured': '#4575b4', 'metadata': '#878787'}

def plot_caption_table(rows:Sequence[dict], # caption dataset rows to show
                       records:Sequence[Record]|None=None, # their records, for thumbnails (default: looked up)
                       root:str|Path|None=None, # data root (thumbnails)
                       width:float=13. # figure width, inches
                      ):
    "One line per record: thumbnail, then its caption's phrases boxed in the colour of their provenance."
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch
    recs = records or caption_records(rows, root)
    fig, axs = plt.subplots(len(rows), 2, figsize=(width, 1.05 * len(rows) + .6), gridspec_kw={'width_ratios': [1, 11]}, squeeze=False)
    for (a0, a1), row, rec in zip(axs, rows, recs):
        a0.imshow(fit_square(load_image(rec.image), 96, 'squash')); a0.set_axis_off(); a0.set_title(f"{row['source']}\n{row['id']}", fontsize=6)
        a1.set_axis_off(); x, y = 0., .72
        a1.text(0, .97, row['caption'], fontsize=7, va='top', style='italic', transform=a1.transAxes)
        for p in row['phrases']:
            label = p['text'] + (f" ({p['confidence']:.2f})" if p.get('confidence') is not None else '')
            t = a1.text(x, y, label, fontsize=7, va='top', color='white', transform=a1.transAxes,
                        bbox=dict(boxstyle='round,pad=0.25', fc=PROVENANCE_COLOURS[p['source']], ec='none'))
            fig.canvas.draw(); bb = t.get_window_extent().transformed(a1.transAxes.inverted())
            x = bb.x1 + .01
            if x > .9: x, y = 0., y - .32
        if row.get('dropped'): a1.text(0, .05, 'dropped for length: ' + '; '.join(d['text'] for d in row['dropped']), fontsize=6,
                                       color='#888888', va='bottom', transform=a1.transAxes)
    fig.legend(handles=[Patch(color=c, label=k) for k, c in PROVENANCE_COLOURS.items()], loc='lower center', ncol=6, fontsize=8,
               title='provenance', title_fontsize=8)
    fig.subplots_adjust(bottom=.6 / (1.05 * len(rows) + .6), hspace=.35)
    return fig


# %%
fig = plot_caption_table(rows[:3], root=ROOT)
test_eq(len(fig.axes), 6); assert any(t.get_bbox_patch() is not None for t in fig.axes[1].texts)
import matplotlib.pyplot as plt; plt.close('all')
