# %% [markdown]
# # Segmenters and mask refinement
#
# > The project's supervised lesion segmenter (a U-Net on a pretrained EfficientNet-Lite0 encoder), the Otsu
# > baseline, DenseCRF refinement, and whole-image prediction at the input size.

# %%
#| default_exp segmenter

# %%
#| export
from __future__ import annotations
import functools, math, time, warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence
import numpy as np
import pandas as pd
import torch, torch.nn as nn, torch.nn.functional as F
from PIL import Image
from scipy import ndimage as ndi
from skimage.filters import threshold_otsu, gaussian
from tqdm.auto import tqdm
from dermnb.core import (Config, DataError, DermnbError, TrainingDivergedError, cached_dir, get_device, seed_everything, load_image,
                         atomic_save, get_profile)
from dermnb.data import DermDataset, Record, fit_square, get_split
from dermnb.pretrained import load_effnet_lite0, lite0_pyramid, LITE0_TAP_CHANNELS
from dermnb.metrics import seg_metrics

# %%
from fastcore.test import test_eq, test_close, test_fail
import tempfile
from dermnb.core import data_root, load_mask
ROOT = data_root()
torch.set_num_threads(2)


# %% [markdown]
# ## The Otsu baseline
#
# DiffSeg's paper compares with plain thresholding. Lesions are darker than the surrounding skin, so Otsu's threshold
# on the blurred grey image separates them; dermoscopes add dark vignette corners, so of the dark connected regions we
# keep the largest one that does not touch the image border (falling back to the largest overall), and fill its holes.
# This is a fair, documented baseline, not a straw man.

# %%
#| export
def otsu_segment(image, # PIL image or HxWx3 array
                 sigma:float=2.0 # Gaussian blur (pixels) before thresholding
                )->np.ndarray:
    "Lesion mask (H, W) bool from Otsu's threshold on the blurred grey image."
    g = gaussian(np.asarray(load_image(image) if isinstance(image, (str, Path)) else image, dtype=np.float32).mean(-1) / 255, sigma)
    if g.max() - g.min() < 1e-6: return np.zeros(g.shape, bool)
    dark = g < threshold_otsu(g)
    lab, n = ndi.label(dark)
    if n == 0: return dark
    sizes = ndi.sum(dark, lab, range(1, n + 1))
    border = set(np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]]))) - {0}
    inner = [i for i in range(1, n + 1) if i not in border]
    best = max(inner, key=lambda i: sizes[i-1]) if inner else int(np.argmax(sizes)) + 1
    return ndi.binary_fill_holes(lab == best)


# %%
t1 = get_split('isic2018_task1', 'train', ROOT)
from dermnb.core import load_mask
def _dice(a, b): return seg_metrics(a, b)['dice']
d = [_dice(otsu_segment(load_image(r.image)), load_mask(r.mask)) for r in t1[:20]]
assert np.mean(d) > .5, np.mean(d)                       # a real baseline: it finds most lesions
test_eq(otsu_segment(np.full((32, 32, 3), 128, np.uint8)).sum(), 0)   # flat image: empty mask, no crash

# %% [markdown]
# ## The colour baseline: distance from the image's own skin
#
# A second training-free floor, stronger than Otsu on grey levels. Dermoscopic images frame the lesion with skin, so
# the image corners give a skin colour model: the mean and covariance of the corner pixels in CIE Lab (vignetted,
# near-black pixels excluded). Each pixel's Mahalanobis distance from that model, smoothed, is split by Otsu; the
# connected component nearest the image centre is kept and its holes filled. No training, no masks: any weakly
# supervised method must clear this floor.

# %%
#| export
DARK = 40   # grey level below which a pixel is vignette or frame (the colour baseline and DiffSeg's weak data)

def vignette_mask(image, # PIL image or HxWx3 array
                  dilate:int=0, # grow the vignette by this many pixels (its blurred rim)
                  dark:int=DARK # grey level below which a pixel is dark
                 )->np.ndarray:
    "The dermatoscope's vignette and frame (H, W) bool: near-black regions connected to the image border."
    a = np.asarray(load_image(image) if isinstance(image, (str, Path)) else image)[..., :3]
    lab, n = ndi.label(a.mean(-1) < dark)
    border = np.setdiff1d(np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]])), [0])
    v = np.isin(lab, border)
    return ndi.binary_dilation(v, iterations=dilate) if dilate and v.any() else v


# %% [markdown]
# A dark lesion is dark too, but it sits inside the skin; the vignette is the dark region that reaches the image
# border. Segmenters that read a map (DiffSeg) exclude it, since a model that learned bright skin lights it as
# "not skin".

# %%
vg = np.full((40, 60, 3), 180, np.uint8); vg[:8] = 0; vg[18:24, 28:34] = 10      # a dark frame band and a dark lesion
test_eq(vignette_mask(vg).sum(), 8 * 60)                                        # the band, not the lesion
test_eq(vignette_mask(vg, dilate=2).sum(), 10 * 60)
test_eq(vignette_mask(np.full((8, 8, 3), 200, np.uint8)).sum(), 0)


# %%
#| export
@functools.lru_cache(maxsize=8)
def _centre_distance(H:int, W:int)->np.ndarray:
    "Each pixel's distance from the image centre (cached per shape)."
    yy, xx = np.mgrid[:H, :W]; return np.hypot(yy - (H - 1) / 2, xx - (W - 1) / 2)


# %%
test_close(_centre_distance(3, 3)[1, 1], 0.); test_close(_centre_distance(3, 3)[0, 0], 2 ** .5)


# %%
#| export
def central_component(fg:np.ndarray, # binary mask (H, W)
                      min_frac:float=.01 # components smaller than this share of the image are not candidates (unless none is larger)
                     )->np.ndarray:
    "The sizeable connected component nearest the image centre: dermoscopy frames the lesion."
    lab, n = ndi.label(fg)
    if n == 0: return fg.astype(bool)
    H, W = fg.shape; d = _centre_distance(H, W)
    sizes = ndi.sum(fg, lab, range(1, n + 1))
    dists = [d[sl][lab[sl] == i + 1].min() for i, sl in enumerate(ndi.find_objects(lab))]   # per-box minimum: no sort of the image
    big = [i for i in range(n) if sizes[i] >= min_frac * H * W] or list(range(n))
    return lab == min(big, key=lambda i: dists[i]) + 1


# %% [markdown]
# Why the centre and not the largest component: a dermoscopic image is taken *of* a lesion, so the lesion sits near
# the middle, while what else lights up in a map (vignette corners, colour calibration stickers, rulers) sits at the
# edges and can be larger. The colour baseline and DiffSeg's mask rule share this prior; DiffSeg's calibration
# chooses between it and the largest component on the training split.

# %%
cc = np.zeros((30, 40), bool); cc[:12, :12] = True; cc[13:18, 18:23] = True; cc[14, 19] = False
test_eq(central_component(cc).sum(), 24)                                       # the small central blob (with its hole)
test_eq(central_component(cc, min_frac=.05).sum(), 144)                        # too small to count: the big one
test_eq(central_component(np.zeros((5, 5), bool)).sum(), 0)


# %%
#| export
def colour_segment(image, # PIL image or HxWx3 array
                   corner:float=.15, # side of the corner squares that model skin, as a fraction of the short side
                   sigma:float=2.0, # Gaussian smoothing of the distance map (pixels)
                   dark:int=DARK # luminance below this is vignette, excluded from the skin model
                  )->np.ndarray:
    "Lesion mask (H, W) bool from the Lab Mahalanobis distance to the image's corner skin."
    from skimage.color import rgb2lab
    a = np.asarray(load_image(image) if isinstance(image, (str, Path)) else image, dtype=np.uint8)[..., :3]
    H, W = a.shape[:2]; s = max(2, int(min(H, W) * corner))
    lab = rgb2lab(a).reshape(-1, 3)
    cm = np.zeros((H, W), bool); cm[:s, :s] = cm[:s, -s:] = cm[-s:, :s] = cm[-s:, -s:] = True
    skin = cm.ravel() & (a.mean(-1).ravel() >= dark)
    if skin.sum() < 10: skin = cm.ravel()                      # all corners vignetted: use them anyway
    mu, cov = lab[skin].mean(0), np.cov(lab[skin].T) + np.eye(3) * 1.
    d = lab - mu
    dist = gaussian(np.sqrt(np.einsum('ij,jk,ik->i', d, np.linalg.inv(cov), d)).reshape(H, W), sigma)
    if dist.max() - dist.min() < 1e-6: return np.zeros((H, W), bool)
    fg = (dist > threshold_otsu(dist)) & (a.mean(-1) >= dark)   # vignette is not lesion
    return ndi.binary_fill_holes(central_component(fg))


# %%
dc = [_dice(colour_segment(load_image(r.image)), load_mask(r.mask)) for r in t1[:20]]
assert np.mean(dc) > np.mean(d), (np.mean(dc), np.mean(d))   # a stronger floor than Otsu on the same images
test_eq(colour_segment(np.full((32, 32, 3), 128, np.uint8)).sum(), 0)   # flat image: empty mask
blob = np.full((60, 80, 3), (200, 150, 130), np.uint8); blob[20:40, 30:50] = (90, 50, 40)
test_eq(colour_segment(blob, sigma=0).sum(), 400)                       # a brown spot on pink skin, exactly


# %% [markdown]
# ## DenseCRF refinement
#
# A fully connected CRF (Krähenbühl & Koltun) sharpens a soft lesion map along colour edges. The unary is the negative
# log of the softmax over {skin, lesion}; the pairwise terms are a Gaussian smoothness kernel and a bilateral
# (position + colour) appearance kernel. DiffSeg applies it to the averaged multi-output map; its parameters are
# chosen on the training split (`crf_grid_search`).

# %%
#| export
@dataclass(frozen=True)
class CRFParams(Config):
    "DenseCRF kernel parameters."
    sxy_gaussian:float=3.      # spatial std of the smoothness kernel (pixels)
    compat_gaussian:float=3.   # weight of the smoothness kernel
    sxy_bilateral:float=40.    # spatial std of the appearance kernel (pixels)
    srgb:float=13.             # colour std of the appearance kernel
    compat_bilateral:float=5.  # weight of the appearance kernel
    iters:int=5                # mean-field iterations

def dense_crf(image, # HxWx3 uint8 array or PIL image
              prob:np.ndarray, # lesion probability (H, W) in [0, 1]
              params:CRFParams=CRFParams() # kernel parameters
             )->np.ndarray:
    "Refine a lesion probability map with a fully connected CRF; returns the refined probability (H, W)."
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_softmax
    img = np.array(np.asarray(image, dtype=np.uint8)[..., :3], order='C')   # a writable copy: pydensecrf needs one
    h, w = prob.shape
    if img.shape[:2] != (h, w): raise DataError(f"dense_crf: image {img.shape[:2]} and probability map {(h, w)} differ in size")
    p = np.clip(prob.astype(np.float32), 1e-5, 1 - 1e-5)
    crf = dcrf.DenseCRF2D(w, h, 2)
    crf.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(np.stack([1 - p, p]))))
    crf.addPairwiseGaussian(sxy=params.sxy_gaussian, compat=params.compat_gaussian)
    crf.addPairwiseBilateral(sxy=params.sxy_bilateral, srgb=params.srgb, rgbim=img, compat=params.compat_bilateral)
    q = np.array(crf.inference(int(params.iters))).reshape(2, h, w)
    return q[1]


# %%
img = np.zeros((48, 64, 3), np.uint8); img[12:36, 16:48] = 200          # a bright square on black
noisy = np.zeros((48, 64), np.float32); noisy[10:38, 14:50] = .6          # a blurry, too large guess
refined = dense_crf(img, noisy, CRFParams(sxy_bilateral=20, srgb=5, compat_bilateral=10)) > .5
truth = img[..., 0] > 0
assert _dice(refined, truth) > _dice(noisy > .5, truth)                   # the CRF snaps to the colour edge
test_fail(lambda: dense_crf(img, noisy[:10]), contains='differ in size')


# %%
#| export
def crf_grid_search(images:Sequence[np.ndarray], # HxWx3 uint8 images (training split)
                    probs:Sequence[np.ndarray], # soft lesion maps, same sizes
                    gts:Sequence[np.ndarray], # ground-truth masks, used only to choose parameters
                    grid:dict|None=None, # field -> candidate values; default a small grid over the bilateral kernel
                    threshold:float=.5 # binarisation of the refined map
                   )->tuple:
    "Choose CRF parameters by mean Dice on a training set; returns (best CRFParams, table of all candidates)."
    import itertools
    grid = grid or {'sxy_bilateral': [20., 40., 80.], 'srgb': [5., 13., 30.], 'compat_bilateral': [3., 5., 10.]}
    rows = []
    for vals in itertools.product(*grid.values()):
        p = CRFParams(**dict(zip(grid, vals)))
        d = [seg_metrics(dense_crf(i, q, p) > threshold, g)['dice'] for i, q, g in zip(images, probs, gts)]
        rows.append({**p.to_dict(), 'dice': float(np.mean(d))})
    tab = pd.DataFrame(rows).sort_values('dice', ascending=False, kind='stable')
    return CRFParams.from_dict(tab.iloc[0].to_dict()), tab


# %%
best, tab = crf_grid_search([img], [noisy], [truth], {'srgb': [5., 300.], 'compat_bilateral': [10.]})
test_eq(best.srgb, 5.); test_eq(len(tab), 2)


# %% [markdown]
# ## A supervised U-Net on a pretrained encoder
#
# DiffSeg's paper compares against U-Nets trained with masks, and CPDE and SkinDualGen need a segmenter too, so the
# project has one good supervised model. Its encoder is EfficientNet-Lite0 with real ImageNet weights (the project's
# one loader, `dermnb.pretrained.load_effnet_lite0`), which makes CPU training converge in minutes; the decoder is a
# light U-Net over the encoder's stride-2…32 features (`lite0_pyramid`). Inputs are images in [-1, 1], the range Lite0 was trained on.

# %%
#| export
class _Up(nn.Module):
    "Upsample ×2, concatenate the skip, two 3×3 conv-BN-ReLU."
    def __init__(self, cin, cskip, cout):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(cin + cskip, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(True),
                                  nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(True))
    def forward(self, x, skip):
        return self.conv(torch.cat([F.interpolate(x, size=skip.shape[-2:], mode='nearest'), skip], 1))

class LesionUNet(nn.Module):
    "U-Net with an EfficientNet-Lite0 encoder; outputs one lesion logit per pixel."
    def __init__(self, pretrained:bool=True, # ImageNet encoder weights
                 width:int=32 # decoder width at stride 2 (doubles per level)
                ):
        super().__init__()
        self.encoder = load_effnet_lite0(pretrained)
        ch = list(LITE0_TAP_CHANNELS)
        w = [width, width*2, width*4, width*8]
        self.ups = nn.ModuleList([_Up(ch[4], ch[3], w[3]), _Up(w[3], ch[2], w[2]), _Up(w[2], ch[1], w[1]), _Up(w[1], ch[0], w[0])])
        self.head = nn.Conv2d(w[0], 1, 1)

    def forward(self, x):
        if x.shape[-1] % 32 or x.shape[-2] % 32: raise DataError(f"LesionUNet needs sides divisible by 32, got {tuple(x.shape[-2:])}")
        f = lite0_pyramid(self.encoder, x)
        h = f[4]
        for up, skip in zip(self.ups, reversed(f[:4])): h = up(h, skip)
        return F.interpolate(self.head(h), size=x.shape[-2:], mode='bilinear', align_corners=False)


# %%
net = LesionUNet(pretrained=False, width=8)
test_eq(net(torch.randn(2, 3, 64, 96)).shape, (2, 1, 64, 96))
test_fail(lambda: net(torch.randn(1, 3, 50, 64)), contains='divisible by 32')


# %% [markdown]
# ## Training, cached by config
#
# The loss is BCE + soft Dice, the usual pair for lesion masks (BCE for calibrated probabilities, Dice against the
# foreground/background imbalance). Augmentation is paired flips and rotations from the data layer. The trained
# weights are cached under `segmenter/<config hash>/`, with the loss curve and the training time beside them.

# %%
#| export
@dataclass(frozen=True)
class SegmenterConfig(Config):
    "Everything that defines a trained supervised segmenter (and its cache key)."
    dataset:str='isic2018_task1'  # training data (its 'train' split)
    size:int=128                  # square input side
    fit:str='pad'                 # aspect handling, see fit_square
    epochs:int=6                  # passes over the training split
    batch_size:int=16
    lr:float=1e-3
    width:int=32                  # decoder width
    pretrained:bool=True          # ImageNet encoder
    max_images:int=0              # use only the first N training images (0 = all); for tests
    labels:str='masks'            # the targets: 'masks' (ground truth) or a named pseudo-label source (its cache key)
    seed:int=0

    @classmethod
    def for_profile(cls, profile='quick', **kw):
        "Defaults of a run profile: quick trains at 128 px on CPU (about 8000 image steps), full at 384 px on a GPU."
        p = get_profile(profile)
        return cls(**({'size': 128, 'epochs': 5, 'width': 16} if p.name == 'quick' else {'size': 384, 'epochs': 40, 'batch_size': 16}), **kw)

def seg_loss(logits:torch.Tensor, # (B, 1, H, W)
             target:torch.Tensor, # (B, 1, H, W) in [0, 1]
             weight:torch.Tensor|None=None # (B, 1, H, W) per-pixel weights; 0 ignores a pixel (pseudo-labels)
            )->torch.Tensor:
    "BCE + soft Dice, both restricted to the weighted pixels."
    w = torch.ones_like(target) if weight is None else weight
    p = logits.sigmoid() * w; tw = target * w
    dice = 1 - (2 * (p * tw).sum((1, 2, 3)) + 1) / (p.sum((1, 2, 3)) + tw.sum((1, 2, 3)) + 1)
    bce = (F.binary_cross_entropy_with_logits(logits, target, reduction='none') * w).sum() / w.sum().clamp_min(1)
    return bce + dice.mean()


# %% [markdown]
# A zero weight removes a pixel from both terms: a prediction there changes nothing.

# %%
lg = torch.randn(2, 1, 8, 8, requires_grad=True); tg = (torch.rand(2, 1, 8, 8) > .5).float(); wt = torch.ones_like(tg); wt[..., :4] = 0
seg_loss(lg, tg, wt).backward()
test_eq(lg.grad[..., :4].abs().sum().item(), 0.); assert lg.grad[..., 4:].abs().sum() > 0
test_close(seg_loss(lg.detach(), tg), seg_loss(lg.detach(), tg, torch.ones_like(tg)))


# %%
#| export
class PseudoMaskDataset(torch.utils.data.Dataset):
    "In-memory (image, soft target, weight) triples with the paired flips and rotations of `DermDataset`."
    def __init__(self, images:torch.Tensor, # (N, 3, S, S) uint8
                 targets:torch.Tensor, # (N, 1, S, S) float in [0, 1]
                 weights:torch.Tensor, # (N, 1, S, S) float, 0 = ignored pixel
                 augment:bool=True # random paired flips and 90° rotations
                ):
        if not (len(images) == len(targets) == len(weights)): raise DataError(f"{len(images)} images, {len(targets)} targets, {len(weights)} weights")
        self.images, self.targets, self.weights, self.augment = images, targets, weights, augment
    def __len__(self): return len(self.images)
    def __getitem__(self, i):
        x, m, w = self.images[i], self.targets[i], self.weights[i]
        if self.augment:
            k, fh = int(torch.randint(4, ())), bool(torch.randint(2, ()))
            x, m, w = (torch.rot90(a, k, (1, 2)) for a in (x, m, w))
            if fh: x, m, w = x.flip(2), m.flip(2), w.flip(2)
        return {'image': x.float() / 127.5 - 1, 'mask': m, 'weight': w}


# %%
pm = PseudoMaskDataset(torch.zeros(3, 3, 8, 8, dtype=torch.uint8), torch.zeros(3, 1, 8, 8), torch.ones(3, 1, 8, 8))
test_eq(pm[0]['image'].shape, (3, 8, 8)); test_eq(pm[2]['weight'].sum().item(), 64.)
test_fail(lambda: PseudoMaskDataset(torch.zeros(3, 3, 8, 8), torch.zeros(2, 1, 8, 8), torch.zeros(3, 1, 8, 8)), contains='2 targets')


# %%
#| export
def train_segmenter(cfg:SegmenterConfig, # what to train
                    out:Path, # folder for weights.pt and loss.csv
                    root:str|Path|None=None, # data root
                    device:str='auto', # training device
                    dataset:torch.utils.data.Dataset|None=None # items with 'image', 'mask' (and 'weight'); default the masks of the training split
                   )->Path:
    "Train a LesionUNet on the training split (or on `dataset`, e.g. pseudo-labels) and save it into `out`."
    seed_everything(cfg.seed); dev = get_device(device)
    if dataset is not None: ds = dataset
    else:
        recs = get_split(cfg.dataset, 'train', root, seed=0)
        if cfg.max_images: recs = recs[:cfg.max_images]
        ds = DermDataset(recs, cfg.size, cfg.fit, augment=True, in_memory=True)
    dl = torch.utils.data.DataLoader(ds, cfg.batch_size, shuffle=True, drop_last=len(ds) > cfg.batch_size,
                                     generator=torch.Generator().manual_seed(cfg.seed))
    net = LesionUNet(cfg.pretrained, cfg.width).to(dev)
    opt = torch.optim.AdamW(net.parameters(), cfg.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=cfg.epochs * len(dl), pct_start=.15)
    rows, t0 = [], time.time()
    net.train()
    for ep in range(cfg.epochs):
        for b in tqdm(dl, desc=f'segmenter epoch {ep+1}/{cfg.epochs}', leave=False):
            loss = seg_loss(net(b['image'].to(dev)), b['mask'].to(dev), b['weight'].to(dev) if 'weight' in b else None)
            if not torch.isfinite(loss): raise TrainingDivergedError(f"segmenter training: loss became {loss.item()} at epoch {ep}")
            opt.zero_grad(); loss.backward(); opt.step(); sched.step()
            rows.append({'step': len(rows), 'epoch': ep, 'loss': loss.item(), 'seconds': time.time() - t0})
    atomic_save(out/'weights.pt', lambda t: torch.save(net.state_dict(), t))
    atomic_save(out/'loss.csv', lambda t: pd.DataFrame(rows).to_csv(t, index=False))
    return out

def load_segmenter(cfg:SegmenterConfig|None=None, # config; default the quick profile's
                   root:str|Path|None=None, # data root (for training on a cache miss)
                   device:str='auto', # device
                   refresh:bool=False, # retrain even if cached
                   dataset_fn=None # () -> training dataset, required when cfg.labels is not 'masks' (called on a cache miss only)
                  )->LesionUNet:
    "The trained segmenter for `cfg`, training and caching it on first use."
    cfg = cfg or SegmenterConfig.for_profile('quick')
    if cfg.labels != 'masks' and dataset_fn is None: raise DermnbError(f"segmenter labels {cfg.labels!r} need a dataset_fn that builds them")
    d = cached_dir('segmenter', cfg, lambda p: train_segmenter(cfg, p, root, device, dataset_fn() if dataset_fn else None), refresh=refresh)
    net = LesionUNet(pretrained=False, width=cfg.width)
    net.load_state_dict(torch.load(d/'weights.pt', map_location='cpu')); net.cfg, net.cache_dir = cfg, d
    return net.to(get_device(device)).eval()


# %%
with tempfile.TemporaryDirectory() as tmp:
    import os; os.environ['DERMNB_CACHE'] = tmp
    tiny = SegmenterConfig(size=64, epochs=2, batch_size=8, max_images=32, width=8)
    seg = load_segmenter(tiny, ROOT)
    loss = pd.read_csv(seg.cache_dir/'loss.csv').loss
    assert loss.iloc[-2:].mean() < loss.iloc[:2].mean()               # it learns
    assert load_segmenter(tiny, ROOT).cache_dir == seg.cache_dir      # second call: cache hit
    test_fail(lambda: load_segmenter(tiny.replace(labels='pseudo:x'), ROOT), contains='need a dataset_fn')
    # pseudo-labels with an ignored band: trains on the given dataset, cached under its own key
    pl = PseudoMaskDataset(torch.full((8, 3, 64, 64), 128, dtype=torch.uint8), torch.zeros(8, 1, 64, 64), torch.ones(8, 1, 64, 64))
    seg_pl = load_segmenter(tiny.replace(labels='pseudo:test', epochs=1), ROOT, dataset_fn=lambda: pl)
    assert seg_pl.cache_dir != seg.cache_dir and (seg_pl.cache_dir/'weights.pt').exists()
    del os.environ['DERMNB_CACHE']


# %% [markdown]
# ## Predicting at the input size
#
# Users give images of any size and expect masks of that size. `predict_proba` fits each image into the model's square
# (the same `fit` as in training), predicts, undoes the padding or crop, and resizes the probability map back to the
# original size. Grey or RGBA inputs are converted; tiny images are upsampled like any other.

# %%
#| export
@torch.no_grad()
def predict_proba(net:LesionUNet, # trained segmenter (net.cfg gives size and fit)
                  images:Sequence, # PIL images or paths, any size
                  batch_size:int=16 # images per forward pass
                 )->list:
    "Lesion probability maps (H, W) at each image's own size."
    size, fit = net.cfg.size, net.cfg.fit
    dev = next(net.parameters()).device
    ims = [load_image(i) if isinstance(i, (str, Path)) else i.convert('RGB') for i in images]
    out = []
    for s in range(0, len(ims), batch_size):
        chunk = ims[s:s + batch_size]
        x = torch.stack([torch.from_numpy(np.asarray(fit_square(im, size, fit), np.float32)).permute(2, 0, 1) for im in chunk]) / 127.5 - 1
        probs = net(x.to(dev)).sigmoid()[:, 0].cpu().numpy()
        out += [unfit_square(p, im.size, fit) for p, im in zip(probs, chunk)]
    return out

def unfit_square(prob:np.ndarray, # (S, S) map predicted on a fit_square input
                 size:tuple, # original (width, height)
                 fit:str='pad' # the fit used for the input
                )->np.ndarray:
    "Map a square prediction back onto the original image grid (inverse of `fit_square`)."
    S = prob.shape[0]; w, h = size
    if fit == 'pad':
        s = S / max(w, h); nw, nh = max(1, round(w*s)), max(1, round(h*s))
        x0, y0 = (S - nw)//2, (S - nh)//2
        prob = prob[y0:y0+nh, x0:x0+nw]
    elif fit == 'crop':  # the cropped-away border gets the nearest predicted values
        s = S / min(w, h); nw, nh = max(S, round(w*s)), max(S, round(h*s))
        full = np.pad(prob, (((nh - S)//2, nh - S - (nh - S)//2), ((nw - S)//2, nw - S - (nw - S)//2)), mode='edge')
        prob = full
    return np.asarray(Image.fromarray(prob.astype(np.float32)).resize((w, h), Image.BILINEAR))


# %%
p = np.zeros((64, 64), np.float32); p[8:56, :] = 1               # content region of a 4:3 image padded to 64
test_eq(unfit_square(p, (256, 192), 'pad').min(), 1.)            # padding removed exactly
test_eq(unfit_square(p, (256, 192), 'crop').shape, (192, 256))
probs = predict_proba(seg, [load_image(t1[0].image), Image.new('L', (20, 15), 128), Image.new('RGBA', (40, 40))])
test_eq([q.shape for q in probs], [(192, 256), (15, 20), (40, 40)])
assert all(0 <= q.min() and q.max() <= 1 for q in probs)
