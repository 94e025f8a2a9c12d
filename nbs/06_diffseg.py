# %% [markdown]
# # DiffSeg
#
# > Weakly supervised lesion segmentation from the difference of noise predictions under "lesion" and "healthy skin",
# > with multiple outputs across noise steps and seeds, consistency/ambiguity maps, GED uncertainty and DenseCRF.
#
# Seed paper: *DiffSeg: A Segmentation Model for Skin Lesions Based on Diffusion Difference* (ISIC 2018).
# Everything generic comes from the backbone (`dermnb.diffusion`: the model, noising, batched multi-condition noise
# prediction), the metrics (`dermnb.metrics`: Dice/IoU, GED) and the segmenter notebook (Otsu, DenseCRF, U-Net).
# This notebook adds only what is new in the paper.

# %%
#| default_exp diffseg

# %%
#| export
from __future__ import annotations
import math, time, json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence
import numpy as np
import pandas as pd
import torch, torch.nn.functional as F
from PIL import Image
from skimage.filters import threshold_otsu, gaussian
from dermnb.core import Config, DataError, get_device, make_generator, load_image, seed_everything, get_profile
from dermnb.data import Record, get_split, fit_square
from dermnb.diffusion import Backbone, predict_noise_multi
from dermnb.metrics import ged_terms, seg_metrics
from dermnb.segmenter import dense_crf, CRFParams

# %%
from fastcore.test import test_eq, test_close, test_fail
import tempfile
from dermnb.core import data_root, load_mask
from dermnb.diffusion import make_unet, make_scheduler
ROOT = data_root()
torch.set_num_threads(2)


# %% [markdown]
# ## Weak supervision: lesion images and healthy-skin border crops
#
# DiffSeg's diffusion model learns two semantics from image-level information only. **Lesion skin**: whole dermoscopic
# images (every ISIC image shows a lesion). **Healthy skin**: crops from the image corners, which are mostly skin
# because dermoscopic images centre the lesion. No pixel mask is read to build either set. Dermatoscopes darken the
# corners (vignetting), so a corner crop with many near-black pixels is dropped; that rule looks at the image alone.
#
# *What the masks of the training split are used for*: only to choose two scalars after training, the binarisation
# threshold and the DenseCRF parameters (as the paper chooses its hyperparameters on training data). The U-Net
# baseline, by contrast, trains on the masks.

# %%
#| export
def corner_crops(img:Image.Image, # RGB dermoscopic image
                 frac:float=.25, # crop side as a fraction of the short image side
                 max_dark:float=.2 # drop crops with more than this share of near-black pixels (vignette)
                )->list:
    "Healthy-skin candidates: the four corner crops of a dermoscopic image, minus dark vignette corners."
    w, h = img.size; s = max(8, int(min(w, h) * frac))
    boxes = [(0, 0), (w - s, 0), (0, h - s), (w - s, h - s)]
    crops = [img.crop((x, y, x + s, y + s)) for x, y in boxes]
    return [c for c in crops if (np.asarray(c.convert('L')) < 40).mean() <= max_dark]


# %%
recs = get_split('isic2018_task1', 'train', ROOT)
cc = corner_crops(load_image(recs[0].image))
assert 1 <= len(cc) <= 4 and cc[0].size == (48, 48)
# how healthy are the corner crops really? (masks read here only to document the weak labels' noise)
lesion_share = []
for r in recs[:100]:
    m = load_mask(r.mask); s = int(min(m.shape) * .25); H, W = m.shape
    lesion_share += [m[y:y+s, x:x+s].mean() for y, x in [(0, 0), (0, W-s), (H-s, 0), (H-s, W-s)]]
print(f'corner crops with <5% lesion pixels: {np.mean(np.array(lesion_share) < .05):.0%}')
assert np.mean(np.array(lesion_share) < .05) > .8

# %%
#| export
LESION, HEALTHY = 1, 0
CLASS_NAMES = {HEALTHY: 'healthy skin', LESION: 'skin lesion'}

class WeakSkinDataset(torch.utils.data.Dataset):
    "Image-level weak labels: whole images = lesion (1), corner crops = healthy skin (0); no masks."
    def __init__(self, records:Sequence[Record], # dermoscopic images (any dataset)
                 size:int=64, # model input side
                 crops_per_image:int=1 # healthy crops kept per image (balances the two classes)
                ):
        self.items, self.size = [], size
        for r in records:
            img = load_image(r.image)
            self.items.append((self._tensor(fit_square(img, size, 'squash')), LESION))
            for c in corner_crops(img)[:crops_per_image]: self.items.append((self._tensor(c.resize((size, size), Image.BICUBIC)), HEALTHY))

    @staticmethod
    def _tensor(im): return torch.from_numpy(np.asarray(im, np.float32)).permute(2, 0, 1) / 127.5 - 1
    def __len__(self): return len(self.items)
    def __getitem__(self, i):
        x, y = self.items[i]
        if torch.rand(()) < .5: x = x.flip(2)        # flips keep both semantics
        return {'image': x, 'label': y, 'caption': CLASS_NAMES[y]}


# %%
wds = WeakSkinDataset(recs[:6], size=32)
labels = [wds[i]['label'] for i in range(len(wds))]
test_eq(labels.count(LESION), 6); assert 3 <= labels.count(HEALTHY) <= 6
test_eq(wds[0]['image'].shape, (3, 32, 32)); assert 'mask' not in wds[0]


# %% [markdown]
# ## The diffusion difference
#
# Noise the image to step t, predict the noise under both semantics **on the same x_t** (one batched call of the
# backbone's `predict_noise_multi`), and take the channel-mean absolute difference. Where the image is healthy skin
# both conditions explain it alike; where it is a lesion, the "healthy skin" prediction tries to remove it, so the
# two predictions differ. Each map is smoothed lightly and min-max normalised to [0, 1]: that is the lesion evidence.
#
# All (t, seed) pairs of a batch of images go into as few UNet calls as `max_batch` allows: the K = |t|·|seeds|
# noisy versions of B images are stacked into one batch of K·B, and both conditions double it inside one call.

# %%
#| export
@dataclass(frozen=True)
class DiffSegConfig(Config):
    "DiffSeg inference settings (the paper: t from 60 to 150 of 1000 steps, several noise draws)."
    timesteps:tuple=(60, 90, 120, 150) # noise steps of the multiple outputs
    seeds:tuple=(0, 1)                 # noise draws per step
    sigma:float=1.0                    # Gaussian smoothing of each map, in model pixels
    threshold:float|None=None          # fixed threshold on normalised maps (chosen on the training split); None = Otsu per map
    crf:CRFParams=CRFParams()          # DenseCRF parameters (chosen on the training split)
    max_batch:int=256                  # noisy images per UNet call (x2 for the two conditions)

def _noised(bb:Backbone, z0:torch.Tensor, timesteps, seeds)->tuple:
    "All (t, seed) noisings of z0, stacked (K*B, ...), with their timesteps."
    xs, ts = [], []
    for t in timesteps:
        for s in seeds:
            noise = torch.randn(z0.shape, generator=make_generator(s), dtype=z0.dtype).to(z0.device)
            xs.append(bb.scheduler.add_noise(z0, noise, torch.full((z0.shape[0],), t, dtype=torch.long)))
            ts.append(torch.full((z0.shape[0],), t, dtype=torch.long))
    return torch.cat(xs), torch.cat(ts).to(z0.device)

@torch.no_grad()
def diffusion_difference(bb:Backbone, # trained backbone knowing both semantics
                         images:torch.Tensor, # (B, 3, S, S) in [-1, 1] at the backbone's image size
                         cfg:DiffSegConfig=DiffSegConfig(), # steps, seeds, smoothing, batching
                         conds:tuple|None=None # (lesion, healthy) conditions; default the class labels / captions
                        )->torch.Tensor:
    "Normalised difference maps (B, K, S, S) for the K = |timesteps|·|seeds| outputs, in [0, 1]."
    B = images.shape[0]
    z0 = bb.encode(images.to(bb.device))
    lesion, healthy = conds or (bb.cond([LESION]) if bb.kind == 'class' else bb.cond([CLASS_NAMES[LESION]]),
                                bb.cond([HEALTHY]) if bb.kind == 'class' else bb.cond([CLASS_NAMES[HEALTHY]]))
    x, t = _noised(bb, z0, cfg.timesteps, cfg.seeds)
    outs = []
    for i in range(0, len(x), cfg.max_batch):
        e = predict_noise_multi(bb.unet, x[i:i + cfg.max_batch], t[i:i + cfg.max_batch], [lesion, healthy])
        outs.append((e[0] - e[1]).abs().mean(1))
    d = torch.cat(outs).view(-1, B, *outs[0].shape[-2:]).transpose(0, 1)        # (B, K, h, w)
    if d.shape[-1] != images.shape[-1]: d = F.interpolate(d, size=images.shape[-2:], mode='bilinear', align_corners=False)
    d = d.cpu().numpy()
    if cfg.sigma: d = np.stack([[gaussian(m, cfg.sigma) for m in row] for row in d])
    lo, hi = d.min((2, 3), keepdims=True), d.max((2, 3), keepdims=True)
    return torch.from_numpy((d - lo) / np.maximum(hi - lo, 1e-8)).float()


# %% [markdown]
# A test backbone, untrained but class-conditional, shows the shapes, the batching and the determinism. With one
# call per `max_batch` chunk the result does not depend on the chunking.

# %%
tiny_bb = Backbone(make_unet('class', sample_size=16, block_out_channels=(16, 32), num_classes=2, head_dim=8),
                   make_scheduler(), num_classes=2, image_size=16)
x16 = torch.rand(3, 3, 16, 16) * 2 - 1
cfg_t = DiffSegConfig(timesteps=(60, 150), seeds=(0, 1, 2))
d1 = diffusion_difference(tiny_bb, x16, cfg_t)
test_eq(d1.shape, (3, 6, 16, 16)); test_close(d1.amax((2, 3)), torch.ones(3, 6))
test_close(d1, diffusion_difference(tiny_bb, x16, cfg_t.replace(max_batch=4)), eps=1e-5)   # chunking-invariant
assert torch.equal(d1, diffusion_difference(tiny_bb, x16, cfg_t))                           # seeded noise: deterministic


# %% [markdown]
# ## Multiple outputs, consistency and ambiguity
#
# Each (t, seed) map binarised is one output, like one annotator. Their pixel-wise vote `p` gives the **consistent
# lesion** (all outputs say lesion, p = 1), **consistent skin** (p = 0) and the **ambiguous** region (0 < p < 1), with
# ambiguity strength 4p(1 − p) (1 where the outputs split evenly). The per-image **uncertainty** is the diversity term
# of the GED among the outputs, E[d(S, S')] with d = 1 − IoU (the toolkit's `ged_terms`): it needs no ground truth.
# Against a ground truth the full GED is reported too.

# %%
#| export
def binarize_maps(maps:np.ndarray, # normalised maps (..., H, W) in [0, 1]
                  threshold:float|None=None # fixed threshold; None = Otsu per map
                 )->np.ndarray:
    "Binary outputs from difference maps (Otsu per map unless a threshold is given)."
    flat = maps.reshape(-1, *maps.shape[-2:])
    out = np.stack([m > (threshold if threshold is not None else (threshold_otsu(m) if m.max() > m.min() else 1.)) for m in flat])
    return out.reshape(maps.shape)

def consistency_maps(outputs:np.ndarray # binary outputs (K, H, W) of one image
                    )->dict:
    "Vote fraction, consistent lesion/skin masks and ambiguity (4p(1-p)) of K binary outputs."
    p = outputs.mean(0)
    return {'vote': p, 'consistent_lesion': p == 1, 'consistent_skin': p == 0, 'ambiguous': (p > 0) & (p < 1),
            'ambiguity': 4 * p * (1 - p)}

def output_uncertainty(outputs:np.ndarray # binary outputs (K, H, W) of one image
                      )->float:
    "Diversity of the outputs, E[d(S,S')] with d = 1 - IoU (the sample term of GED)."
    return ged_terms(outputs, outputs[:1])['d_ss']


# %%
o = np.zeros((4, 8, 8), bool); o[:, 2:6, 2:6] = True; o[0, 0, 0] = True; o[1, 6, 6] = True
c = consistency_maps(o)
test_eq(c['consistent_lesion'].sum(), 16); test_eq(c['ambiguous'].sum(), 2); test_close(c['ambiguity'][0, 0], .75)
test_eq(output_uncertainty(np.repeat(o[2:3], 4, 0)), 0.)                 # identical outputs: no uncertainty
assert output_uncertainty(o) > 0
test_eq(binarize_maps(np.array([[[0., .2], [.9, 1.]]]), .5).tolist(), [[[False, False], [True, True]]])


# %% [markdown]
# ## Segmenting images of any size
#
# `DiffSeg.segment` runs the whole method on PIL images of any size and mode: squash to the model's input (the
# training fit), compute the K maps, resize them back to the image, binarise each (the outputs), fuse them by the
# mean map (thresholded like each output), and refine the mean map with DenseCRF. It returns everything a figure or
# the CLI needs, per image.

# %%
#| export
class DiffSeg:
    "DiffSeg on a trained backbone: multiple outputs, fused mask, CRF refinement and uncertainty."
    def __init__(self, bb:Backbone, # backbone that knows 'lesion' and 'healthy skin'
                 cfg:DiffSegConfig=DiffSegConfig() # inference settings
                ): self.bb, self.cfg = bb, cfg

    def maps(self, images:Sequence[Image.Image], batch_size:int=16)->list:
        "K normalised difference maps per image, at each image's own size."
        S, out = self.bb.image_size, []
        for i in range(0, len(images), batch_size):
            chunk = [im.convert('RGB') for im in images[i:i + batch_size]]
            x = torch.stack([WeakSkinDataset._tensor(fit_square(im, S, 'squash')) for im in chunk])
            d = diffusion_difference(self.bb, x, self.cfg).numpy()
            out += [np.stack([np.asarray(Image.fromarray(m).resize(im.size, Image.BILINEAR)) for m in row]) for row, im in zip(d, chunk)]
        return out

    def segment(self, images:Sequence, # PIL images or paths
                crf:bool=True, # also compute the DenseCRF-refined mask
                batch_size:int=16 # images per backbone batch
               )->list:
        "Per image: outputs (K,H,W), mean map, fused mask, CRF mask, consistency maps and uncertainty."
        ims = [load_image(i) if isinstance(i, (str, Path)) else i.convert('RGB') for i in images]
        res = []
        for im, maps in zip(ims, self.maps(ims, batch_size)):
            outs = binarize_maps(maps, self.cfg.threshold)
            mean = maps.mean(0)
            fused = binarize_maps(mean[None], self.cfg.threshold)[0]
            r = {'outputs': outs, 'mean_map': mean, 'mask': fused, 'uncertainty': output_uncertainty(outs),
                 **consistency_maps(outs)}
            if crf: r['crf_mask'] = dense_crf(np.asarray(im), _crf_prob(mean, fused), self.cfg.crf) > .5
            res.append(r)
        return res

def _crf_prob(mean:np.ndarray, fused:np.ndarray)->np.ndarray:
    "CRF unary input: the mean map rescaled so that the fused mask's threshold sits at 0.5."
    thr = mean[fused].min() if fused.any() else 1.
    return np.where(mean >= thr, .5 + .5 * (mean - thr) / max(1 - thr, 1e-6), .5 * mean / max(thr, 1e-6)).clip(0, 1)


# %%
ds_t = DiffSeg(tiny_bb, cfg_t)
res = ds_t.segment([load_image(recs[0].image), Image.new('L', (10, 7), 90), Image.new('RGBA', (40, 30))])
test_eq([r['mask'].shape for r in res], [(192, 256), (7, 10), (30, 40)])     # input size, any mode, tiny images
test_eq(res[0]['outputs'].shape, (6, 192, 256)); assert 0 <= res[0]['uncertainty'] <= 1
assert res[1]['mask'].dtype == bool and 'crf_mask' in res[2]

# %% [markdown]
# ## Segmenting a folder (the `dermnb segment` command)
#
# Every method is a function from images to per-image results with at least a `mask`; DiffSeg adds the ambiguity map
# and its uncertainty. `segment_folder` reads every image of a folder (any format PIL reads; an unreadable file is an
# error that names it, raised before anything is written), writes `<stem>_segmentation.png` (0/255, the input size:
# `ISIC_xxxxxxx.jpg` gives the ISIC name `ISIC_xxxxxxx_segmentation.png`) atomically, and with `uncertainty=True` also
# `<stem>_ambiguity.png` and `uncertainty.csv`. The output folder is what `dermnb eval seg` reads.

# %%
#| export
IMAGE_SUFFIXES = {'.jpg', '.jpeg', '.png', '.bmp', '.tif', '.tiff', '.webp'}

def list_images(folder:str|Path # input folder
               )->list:
    "Image files of a folder (sorted), skipping masks written by a segmenter."
    folder = Path(folder)
    if not folder.is_dir(): raise DataError(f"{folder}: image folder not found")
    files = [p for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith('.')
             and not p.stem.endswith(('_segmentation', '_ambiguity'))]
    if not files: raise DataError(f"{folder}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return files

def segment_folder(method_fn, # images (list of PIL) -> list of dicts with 'mask' (and 'ambiguity', 'uncertainty')
                   images_dir:str|Path, # input images
                   out_dir:str|Path, # output folder (created)
                   uncertainty:bool=False, # also write ambiguity maps and uncertainty.csv
                   batch_size:int=16, # images per call of method_fn
                   progress:bool=True # show a progress bar
                  )->pd.DataFrame:
    "Segment every image of a folder, writing ISIC-named 0/255 masks of the input size."
    from dermnb.core import save_image, atomic_save
    from tqdm.auto import tqdm
    files = list_images(images_dir); out_dir = Path(out_dir); out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in tqdm(range(0, len(files), batch_size), desc='segment', disable=not progress):
        chunk = files[i:i + batch_size]
        ims = [load_image(f) for f in chunk]                   # DataError names an unreadable file
        for f, im, r in zip(chunk, ims, method_fn(ims)):
            m = np.asarray(r['mask'], bool)
            if m.shape != (im.size[1], im.size[0]): raise DataError(f"{f}: method returned a {m.shape} mask for a {im.size} image")
            save_image(m, out_dir/f'{f.stem}_segmentation.png')
            row = {'id': f.stem, 'file': f.name, 'lesion_fraction': float(m.mean())}
            if uncertainty and 'ambiguity' in r:
                save_image(np.asarray(r['ambiguity'], np.float32), out_dir/f'{f.stem}_ambiguity.png')
                row['uncertainty'] = r['uncertainty']
            rows.append(row)
    table = pd.DataFrame(rows)
    if uncertainty: atomic_save(out_dir/'uncertainty.csv', lambda t: table.to_csv(t, index=False))
    return table


# %% [markdown]
# The baselines as methods: Otsu needs no model; the U-Net is the segmenter notebook's cached model.

# %%
#| export
def otsu_method(images:Sequence)->list:
    "Otsu baseline as a segmentation method."
    from dermnb.segmenter import otsu_segment
    return [{'mask': otsu_segment(np.asarray(im))} for im in images]

def unet_method(net, # trained LesionUNet (see `load_segmenter`)
                threshold:float=.5 # probability threshold
               ):
    "The supervised U-Net as a segmentation method."
    from dermnb.segmenter import predict_proba
    return lambda images: [{'mask': p > threshold} for p in predict_proba(net, images)]


# %%
import shutil
with tempfile.TemporaryDirectory() as d:
    d = Path(d); (d/'in').mkdir()
    for r in recs[:3]: shutil.copy(r.image, d/'in')
    Image.new('L', (20, 10), 100).save(d/'in'/'gray_photo.png')
    tab = segment_folder(otsu_method, d/'in', d/'out', progress=False)
    test_eq(sorted(p.name for p in (d/'out').iterdir()), sorted([f'{r.id}_segmentation.png' for r in recs[:3]] + ['gray_photo_segmentation.png']))
    test_eq(load_mask(d/'out'/f'{recs[0].id}_segmentation.png').shape, (192, 256))
    (d/'in'/'broken.jpg').write_bytes(b'\xff\xd8 not really'); 
    test_fail(lambda: segment_folder(otsu_method, d/'in', d/'out2', progress=False), contains='broken.jpg')
    assert not (d/'out2').exists() or not any((d/'out2').iterdir())       # nothing half-written
    test_fail(lambda: segment_folder(otsu_method, d/'nothing', d/'o'), contains='image folder not found')

# %% [markdown]
# ## The DiffSeg diffusion model
#
# DiffSeg needs a model that knows both semantics. It is trained with the backbone's trainer (`train_cached`, so
# the same config returns the same cached model) on the weak-label dataset above: class 1 = lesion, class 0 = healthy
# skin (plus the trainer's null class for guidance). The quick profile trains a small class-conditional pixel-space
# model at 32 px on CPU: 500 steps of 32 images (16k image steps), capped at 15 minutes of training. Pixel
# space, because DiffSeg's maps need spatial detail and encoding thousands of training crops with TAEF2 costs more CPU
# time than the training itself (about 3.5 GFLOP per 128 px image); the full profile
# fine-tunes Stable Diffusion 2 with LoRA on the same data with the captions "skin lesion" / "healthy skin", and
# DiffSeg then compares those two prompts.

# %%
#| export
from dermnb.training import TrainConfig, train_cached, load_trained

WEAK_DATA = 'diffseg-weak-v1:isic2018_task1/train(seed0)/whole-vs-corner-crops'

def diffseg_train_config(profile:str='quick', # 'quick' (CPU) or 'full' (GPU, SD 2 + LoRA)
                         **kw # TrainConfig overrides
                        )->TrainConfig:
    "The DiffSeg diffusion model's training config for a profile."
    if get_profile(profile).name == 'quick':
        base = dict(data=WEAK_DATA, space='pixel', image_size=32, cond='class', num_classes=2, channels=(32, 64, 64),
                    attn_levels=(False, False, False), steps=500, batch_size=32, lr=1e-3, warmup=50, ema_decay=.995,
                    max_minutes=15., ckpt_every=100, log_every=10)
    else:
        base = dict(data=WEAK_DATA, space='latent', ae='sd:stabilityai/stable-diffusion-2-base', image_size=512, cond='text',
                    base='sd:stabilityai/stable-diffusion-2-base', lora_rank=8, steps=3000, batch_size=8, lr=1e-4,
                    mixed_precision='bf16', ckpt_every=500)
    return TrainConfig(**{**base, **kw})

def load_diffseg_backbone(profile:str='quick', # run profile
                          root:str|Path|None=None, # data root (training data on a cache miss)
                          device:str='auto', # device
                          progress:bool=True, # training progress bars
                          **kw # TrainConfig overrides
                         )->Backbone:
    "The trained DiffSeg backbone for a profile, training and caching it on first use."
    cfg = diffseg_train_config(profile, **kw)
    fn = lambda: WeakSkinDataset(get_split('isic2018_task1', 'train', root), size=cfg.image_size)
    path = train_cached(cfg, fn, device=device, progress=progress)
    bb = load_trained(path, device=get_device(device)); bb.cache_dir = path
    return bb


# %% [markdown]
# ## Choosing the threshold and the CRF on the training split
#
# Two scalars are chosen after training, on training-split images with their masks: the binarisation threshold of the
# normalised maps (Otsu per map is the baseline rule, and a candidate) and the DenseCRF parameters (`crf_grid_search`).
# The test splits are never looked at. The choice is cached next to the model.

# %%
#| export
THRESHOLDS = (None, .2, .3, .4, .5, .6)

def calibrate(ds:DiffSeg, # DiffSeg with a trained backbone
              records:Sequence[Record], # training-split records with masks
              thresholds:Sequence=THRESHOLDS, # candidates (None = Otsu per map)
              crf_grid:dict|None=None # DenseCRF grid, see crf_grid_search
             )->tuple:
    "Pick the threshold and CRF parameters by mean Dice on training images; returns (config, table)."
    from dermnb.segmenter import crf_grid_search
    from dermnb.core import load_mask
    ims = [load_image(r.image) for r in records]; gts = [load_mask(r.mask) for r in records]
    maps = ds.maps(ims)
    rows = []
    for th in thresholds:
        d = [seg_metrics(binarize_maps(m.mean(0)[None], th)[0], g)['dice'] for m, g in zip(maps, gts)]
        rows.append({'param': 'threshold', 'value': 'otsu' if th is None else th, 'dice': float(np.mean(d))})
    tab = pd.DataFrame(rows); best = tab.dice.idxmax(); th = thresholds[best]
    probs = []
    for m in maps:
        mean = m.mean(0); probs.append(_crf_prob(mean, binarize_maps(mean[None], th)[0]))
    crf, ctab = crf_grid_search([np.asarray(i) for i in ims], probs, gts, crf_grid)
    ctab = ctab.assign(param='crf', value=ctab.drop(columns='dice').apply(lambda r: json.dumps(r.to_dict()), axis=1))
    return ds.cfg.replace(threshold=th, crf=crf), pd.concat([tab, ctab[['param', 'value', 'dice']]], ignore_index=True)


# %% [markdown]
# ## Evaluation: the paper's comparison
#
# Every method is scored per image with the toolkit's `seg_metrics` (Dice, Jaccard, thresholded Jaccard, precision,
# recall, ...). One DiffSeg run gives three of the table's rows: the fused multi-output mask (no CRF), the CRF-refined
# mask, and a single output (the first step and seed, `timesteps[0]`, `seeds[0]`). DiffSeg rows also carry the
# per-image uncertainty (outputs' diversity) and the GED of the outputs against the ground truth.

# %%
#| export
def _rows(dataset, method, ids, masks, gts, extra=None)->list:
    return [{'dataset': dataset, 'method': method, 'id': i, **seg_metrics(m, g), **((extra or [{}]*len(ids))[k])}
            for k, (i, m, g) in enumerate(zip(ids, masks, gts))]

def evaluate_diffseg(ds:DiffSeg, # calibrated DiffSeg
                     records:Sequence[Record], # test records with masks
                     dataset:str, # name for the table
                     batch_size:int=16 # images per backbone batch
                    )->pd.DataFrame:
    "Per-image metrics of DiffSeg (fused, + CRF, single output), with uncertainty and GED."
    from dermnb.core import load_mask
    rows = []
    for s in range(0, len(records), batch_size):
        recs = records[s:s + batch_size]
        ims, gts = [load_image(r.image) for r in recs], [load_mask(r.mask) for r in recs]
        res = ds.segment(ims, crf=True, batch_size=batch_size)
        ids = [r.id for r in recs]
        unc = [{'uncertainty': r['uncertainty'], 'ged': ged_terms(r['outputs'], g[None])['ged']} for r, g in zip(res, gts)]
        rows += _rows(dataset, 'DiffSeg', ids, [r['mask'] for r in res], gts, unc)
        rows += _rows(dataset, 'DiffSeg + CRF', ids, [r['crf_mask'] for r in res], gts, unc)
        rows += _rows(dataset, 'DiffSeg, single output', ids, [r['outputs'][0] for r in res], gts)
    return pd.DataFrame(rows)

def evaluate_method(method_fn, # images -> list of dicts with 'mask'
                    name:str, # method name for the table
                    records:Sequence[Record], # test records with masks
                    dataset:str, # dataset name for the table
                    batch_size:int=16 # images per call
                   )->pd.DataFrame:
    "Per-image metrics of any segmentation method."
    from dermnb.core import load_mask
    rows = []
    for s in range(0, len(records), batch_size):
        recs = records[s:s + batch_size]
        res = method_fn([load_image(r.image) for r in recs])
        rows += _rows(dataset, name, [r.id for r in recs], [r['mask'] for r in res], [load_mask(r.mask) for r in recs])
    return pd.DataFrame(rows)

def comparison_table(per_image:pd.DataFrame # rows from evaluate_diffseg / evaluate_method
                    )->pd.DataFrame:
    "Mean Dice, Jaccard, thresholded Jaccard, precision and recall per dataset and method, with n."
    cols = ['dice', 'jaccard', 'threshold_jaccard', 'precision', 'recall']
    t = per_image.groupby(['dataset', 'method'], sort=False)[cols].mean()
    t['n'] = per_image.groupby(['dataset', 'method'], sort=False).size()
    return t.reset_index()

def uncertainty_error_correlation(per_image:pd.DataFrame, # rows with 'uncertainty' and 'dice'
                                  method:str='DiffSeg + CRF' # whose error (1 - Dice) is correlated
                                 )->pd.DataFrame:
    "Spearman correlation between per-image uncertainty and error (1 - Dice), per dataset."
    from scipy.stats import spearmanr
    rows = []
    for d, g in per_image[per_image.method == method].groupby('dataset', sort=False):
        rho, p = spearmanr(g.uncertainty, 1 - g.dice)
        rows.append({'dataset': d, 'method': method, 'spearman_rho': float(rho), 'p_value': float(p), 'n': len(g)})
    return pd.DataFrame(rows)


# %%
small = recs[:4]
pi = pd.concat([evaluate_diffseg(ds_t, small, 'isic-train'), evaluate_method(otsu_method, 'Otsu', small, 'isic-train')])
tab = comparison_table(pi)
test_eq(list(tab.method), ['DiffSeg', 'DiffSeg + CRF', 'DiffSeg, single output', 'Otsu']); test_eq(set(tab.n), {4})
assert pi[pi.method == 'DiffSeg'].uncertainty.between(0, 1).all() and (pi.dice.between(0, 1)).all()
cor = uncertainty_error_correlation(pi)
test_eq(cor.n.tolist(), [4]); assert -1 <= cor.spearman_rho[0] <= 1 or np.isnan(cor.spearman_rho[0])
cal_cfg, cal_tab = calibrate(ds_t, small, thresholds=(None, .5), crf_grid={'srgb': [13.]})
assert cal_cfg.threshold in (None, .5) and len(cal_tab) == 3


# %% [markdown]
# ## Figures
#
# The paper's figures, as functions, so the figure notebook only calls them. `noise_predictions` exposes the two
# noise predictions of one image at one step (Fig. 2 shows them), and the plotting helpers draw the ground truth in
# green and predictions in red.

# %%
#| export
@torch.no_grad()
def noise_predictions(bb:Backbone, # trained DiffSeg backbone
                      image:Image.Image, # one image
                      t:int=90, # noise step
                      seed:int=0 # noise draw
                     )->dict:
    "Noisy input, noise predictions under 'lesion' and 'healthy skin', and their difference, at the model's size."
    x = WeakSkinDataset._tensor(fit_square(image.convert('RGB'), bb.image_size, 'squash'))[None]
    z0 = bb.encode(x.to(bb.device))
    xt, tt = _noised(bb, z0, [t], [seed])
    e = predict_noise_multi(bb.unet, xt, tt, [bb.cond([LESION]), bb.cond([HEALTHY])])
    return {'x_t': xt[0].cpu(), 'eps_lesion': e[0, 0].cpu(), 'eps_healthy': e[1, 0].cpu(),
            'difference': (e[0, 0] - e[1, 0]).abs().mean(0).cpu()}

def _show(ax, img, title, cmap=None):
    ax.imshow(img, cmap=cmap); ax.set_title(title, fontsize=9); ax.set_axis_off()

def _eps_rgb(e:torch.Tensor)->np.ndarray:
    "A noise prediction shown as an image (per-channel standardised)."
    e = (e - e.mean()) / (e.std() + 1e-8)
    return (e.clamp(-2.5, 2.5) / 5 + .5).permute(1, 2, 0).numpy()

def plot_difference(bb:Backbone, ds:DiffSeg, rec:Record, t:int=90, seed:int=0):
    "Fig. 2: image, the two noise predictions, the difference map and the segmentation."
    import matplotlib.pyplot as plt
    from dermnb.core import overlay_contours, load_mask
    im = load_image(rec.image); npred = noise_predictions(bb, im, t, seed); r = ds.segment([im])[0]
    fig, ax = plt.subplots(1, 5, figsize=(15, 3.2))
    _show(ax[0], im, rec.id); _show(ax[1], _eps_rgb(npred['eps_lesion']), f'ε under "lesion" (t={t})')
    _show(ax[2], _eps_rgb(npred['eps_healthy']), f'ε under "healthy skin" (t={t})')
    _show(ax[3], npred['difference'].numpy(), '|difference| (grey)', 'gray')
    overlay_contours(im, load_mask(rec.mask) if rec.mask else None, r['crf_mask'], ax=ax[4], title='segmentation (red) vs GT (green)')
    fig.tight_layout(); return fig

def plot_steps(ds:DiffSeg, recs:Sequence[Record], seed_index:int=0):
    "Fig. 3: the binarised output at each noise step (one seed), per image."
    import matplotlib.pyplot as plt
    from dermnb.core import overlay_contours, load_mask
    ts = ds.cfg.timesteps; ns = len(ds.cfg.seeds)
    fig, ax = plt.subplots(len(recs), len(ts) + 1, figsize=(2.6 * (len(ts) + 1), 2.2 * len(recs)), squeeze=False)
    for i, rec in enumerate(recs):
        im = load_image(rec.image); r = ds.segment([im], crf=False)[0]; gt = load_mask(rec.mask) if rec.mask else None
        _show(ax[i, 0], im, rec.id)
        for j, t in enumerate(ts): overlay_contours(im, gt, r['outputs'][j * ns + seed_index], ax=ax[i, j + 1], title=f't = {t}')
    fig.tight_layout(); return fig

def plot_consistency(ds:DiffSeg, recs:Sequence[Record]):
    "Fig. 4/5: consistent lesion (all outputs agree) and ambiguous regions (outputs disagree)."
    import matplotlib.pyplot as plt
    from dermnb.core import load_mask, overlay_contours
    fig, ax = plt.subplots(len(recs), 4, figsize=(11, 2.3 * len(recs)), squeeze=False)
    for i, rec in enumerate(recs):
        im = load_image(rec.image); r = ds.segment([im], crf=False)[0]; gt = load_mask(rec.mask) if rec.mask else None
        _show(ax[i, 0], im, rec.id)
        overlay = np.asarray(im, np.float32) / 255; ov = overlay.copy()
        ov[r['consistent_lesion']] = .5 * ov[r['consistent_lesion']] + .5 * np.array([1, .2, .2])
        ov[r['ambiguous']] = .5 * ov[r['ambiguous']] + .5 * np.array([1, 1, .1])
        _show(ax[i, 1], ov, 'consistent (red), ambiguous (yellow)')
        _show(ax[i, 2], r['ambiguity'], f"ambiguity, uncertainty {r['uncertainty']:.2f}", 'magma')
        overlay_contours(im, gt, r['mask'], ax=ax[i, 3], title='fused mask (red) vs GT (green)')
    fig.tight_layout(); return fig

def plot_table(table:pd.DataFrame, title:str=''):
    "Render a comparison table as a figure."
    import matplotlib.pyplot as plt
    t = table.copy()
    for c in t.select_dtypes('float'): t[c] = t[c].map(lambda v: f'{v:.3f}')
    fig, ax = plt.subplots(figsize=(1.6 * len(t.columns), .4 * (len(t) + 2))); ax.set_axis_off()
    tb = ax.table(cellText=t.values, colLabels=list(t.columns), loc='center', cellLoc='center'); tb.scale(1, 1.3)
    tb.auto_set_font_size(False); tb.set_fontsize(8)
    if title: ax.set_title(title)
    return fig


# %%
fig = plot_difference(tiny_bb, ds_t, recs[0], t=60)
test_eq(len(fig.axes), 5); test_eq(fig.axes[1].get_title(), 'ε under "lesion" (t=60)')
npred = noise_predictions(tiny_bb, load_image(recs[0].image), 60)
test_eq(npred['eps_lesion'].shape, (3, 16, 16)); test_eq(npred['difference'].shape, (16, 16))
import matplotlib.pyplot as plt; plt.close('all')
test_eq(len(plot_table(tab, 'x').axes), 1); plt.close('all')


# %% [markdown]
# ## Ready to use: the calibrated DiffSeg of a profile
#
# `load_diffseg` gives the trained backbone with its calibration (threshold and CRF chosen on training images),
# both cached, so the CLI and the figures use the same model. `diffseg_method` makes it a segmentation method for
# `segment_folder`: the CRF mask (or the fused mask), with the ambiguity map and the uncertainty.

# %%
#| export
def load_diffseg(profile:str='quick', # run profile
                 root:str|Path|None=None, # data root (training and calibration data on a cache miss)
                 device:str='auto', # device
                 n_calibration:int=64, # training-split images used to choose threshold and CRF
                 progress:bool=True # progress bars while training
                )->DiffSeg:
    "The trained and calibrated DiffSeg of a profile (both cached)."
    from dermnb.core import cached_dir
    bb = load_diffseg_backbone(profile, root, device, progress)
    base = DiffSegConfig()
    key = {'model': bb.cache_dir.name, 'config': base.to_dict(), 'n_calibration': n_calibration, 'split_seed': 0}
    def build(d):
        cfg, tab = calibrate(DiffSeg(bb, base), get_split('isic2018_task1', 'train', root)[:n_calibration])
        (d/'calibration.json').write_text(json.dumps(cfg.to_dict())); tab.to_csv(d/'calibration.csv', index=False)
    d = cached_dir('diffseg-calibration', key, build)
    c = json.loads((d/'calibration.json').read_text())
    cfg = base.replace(threshold=c['threshold'], crf=CRFParams.from_dict(c['crf']))
    ds = DiffSeg(bb, cfg); ds.calibration = pd.read_csv(d/'calibration.csv')
    return ds

def diffseg_method(ds:DiffSeg, # calibrated DiffSeg
                   crf:bool=True # refine with DenseCRF
                  ):
    "DiffSeg as a segmentation method: mask, ambiguity map and uncertainty per image."
    def fn(images):
        return [{'mask': r['crf_mask'] if crf else r['mask'], 'ambiguity': r['ambiguity'], 'uncertainty': r['uncertainty']}
                for r in ds.segment(images, crf=crf)]
    return fn


# %%
with tempfile.TemporaryDirectory() as d:
    d = Path(d); (d/'in').mkdir()
    for r in recs[:2]: shutil.copy(r.image, d/'in')
    tab = segment_folder(diffseg_method(ds_t), d/'in', d/'out', uncertainty=True, progress=False)
    test_eq(sorted(p.name for p in (d/'out').iterdir()),
            sorted([f'{r.id}_{k}.png' for r in recs[:2] for k in ('segmentation', 'ambiguity')] + ['uncertainty.csv']))
    test_eq(pd.read_csv(d/'out'/'uncertainty.csv').id.tolist(), [r.id for r in recs[:2]])
