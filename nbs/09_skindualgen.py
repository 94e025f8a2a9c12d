# %% [markdown]
# # SkinDualGen
#
# > One text-conditioned latent diffusion model that generates a dermoscopic image *and* its lesion mask in one
# > sampling pass, trained with a multi-objective loss, and what its pairs buy a segmenter and a classifier.
#
# Seed paper: *SkinDualGen: Prompt-Driven Diffusion for Simultaneous Image-Mask Generation in Skin Lesions*: Stable
# Diffusion 2 adapted with LoRA, a jointly optimised multi-objective loss, an image and its mask from text in a single
# pass, and +8% to +15% classification accuracy/F1 and better Dice/IoU with hybrid real + synthetic data. No code is
# public, so the mask mechanism is **ours**, chosen as follows.
#
# **The mechanism: extra latent channels.** The mask is rendered as an image (2m − 1 in all three channels) and encoded
# by the same frozen TAEF2 as the image (`dermnb.diffusion.DualTinyAE`): TAEF2 reconstructs such masks almost exactly,
# and the mask then lives on the same 8×8 latent grid as the image, aligned cell by cell. The shared base UNet is widened
# by 32 input and output channels with zero-initialised weights (`widen_unet_io`), so at step 0 it is exactly the
# pretrained image model, and trained with LoRA on its attention plus the two widened convolutions. Every convolution
# from the first one on sees image and mask latents together, which is what couples them; the mask comes out at image
# resolution through the TAEF2 decoder. The alternatives we read and rejected for this backbone: MedSegFactory stacks
# image and mask as two streams of one batch joined by extra cross-attention layers (it doubles the UNet's cost, and
# our base has attention only at 4×4 and in the mid-block, so the streams would couple on 16 tokens); DiDGen reads the
# mask from the cross-attention maps of a `<lesion>` token (our cross-attention is 4×4, 16 px blocks at 64 px, far too
# coarse for a mask: measured below, after the pairs).

# %%
#| default_exp skindualgen

# %%
#| export
from __future__ import annotations
import json, re, time, warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence
import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm
from dermnb.core import (Config, DermnbError, DataError, cached_dir, tensor_hash, get_profile, load_image, load_mask, save_image,
                         atomic_save, tensor_to_image)
from dermnb.data import Record, get_split, DermDataset, fit_square
from dermnb.metrics import seg_metrics
from dermnb.diffusion import Backbone, unet_eps
from dermnb.training import TrainConfig, train_cached, load_trained
from dermnb.base import base_config, load_base_model, generate
from dermnb.lesiongen import CaptionConfig, caption_dataset, caption_records, lesiongen_prompt, check_prompt

# %%
import tempfile
from fastcore.test import test_eq, test_ne, test_fail, test_close
from dermnb.core import data_root
torch.set_num_threads(2)
ROOT = data_root()

# %% [markdown]
# ## Image–mask pairs for training
#
# The training pairs are the ISIC 2018 Task 1 images (their labels from ISIC 2017 where they have one) and PH2, with
# their ground-truth masks, squashed to the base model's 64 px (masks by nearest neighbour, so they stay binary), the
# mask rendered as three more channels. The prompts are LesionGen's concept-rich captions of the same images (all
# wordings; the trainer draws one per step).

# %%
#| export
PAIR_DATASETS = ('isic2018_task1', 'ph2')

def render_mask(m:torch.Tensor # binary mask (..., 1, H, W) or (..., H, W)
               )->torch.Tensor:
    "A binary mask as a 3-channel image in [-1, 1] (lesion white): how the autoencoder sees a mask."
    m = m.float()
    if m.ndim == 2 or m.shape[-3] != 1: m = m.unsqueeze(-3)
    return (m * 2 - 1).expand(*m.shape[:-3], 3, *m.shape[-2:])


# %%
#| export
class PairDataset(torch.utils.data.Dataset):
    "Image + rendered mask as one 6-channel item (for the trainer), with the records' captions."
    def __init__(self, records:Sequence[Record], # records with masks
                 captions:dict, # (source, id) -> caption or list of captions
                 size:int=64 # square side (squashed)
                ):
        self.ds, self.captions = DermDataset(records, size, 'squash', with_mask=True), captions
    def __len__(self): return len(self.ds)
    def __getitem__(self, i):
        it = self.ds[i]; r = self.ds.records[i]
        return {'image': torch.cat([it['image'], render_mask(it['mask'][0])]), 'label': it['label'], 'id': r.id,
                'caption': self.captions[(r.source, r.id)]}


# %%
recs6 = get_split('isic2018_task1', 'train', ROOT)[:6]
pd6 = PairDataset(recs6, {(r.source, r.id): ['a', 'b'] for r in recs6}, 32)
it = pd6[0]; test_eq(it['image'].shape, (6, 32, 32)); test_eq(set(it['image'][3:].unique().tolist()), {-1., 1.})
test_eq(it['caption'], ['a', 'b']); test_eq(render_mask(torch.ones(2, 4, 4)).shape, (2, 3, 4, 4))

# %% [markdown]
# **The mechanism, measured.** What each candidate could at best deliver on this backbone, on 200 real ISIC 2018
# validation masks at the base model's 64 px: the mask carried in extra latent channels comes back through TAEF2 (the
# ceiling of our design), while a mask read from cross-attention maps (DiDGen) can be no finer than the grid those maps
# live on, 4×4 in the quick base (its only attention level, and the mid-block): here a *perfect* 4×4 map (the true
# mask's area share per cell, upsampled bilinearly) cut at the threshold that gives the true mask's area, an oracle no
# real method has. Small lesions (under 10% of the image), where the consistency falls short, are reported apart. Even
# the oracle stays below the consistency target, and far below the latent channels.

# %%
from dermnb.diffusion import load_ae
vrec = get_split('isic2018_task1', 'val', ROOT)[:200]
vm = torch.stack([x['mask'] for x in DermDataset(vrec, 64, 'squash', with_mask=True)]) > .5   # (N, 1, 64, 64)
ae_ = load_ae('taef2')
with torch.no_grad(): taef = ae_.decode_raw(ae_.encode_raw(render_mask(vm[:, 0]))).mean(1) > 0
u4_ = F.interpolate(F.adaptive_avg_pool2d(vm.float(), 4), size=64, mode='bilinear', align_corners=False)[:, 0]
grid4 = torch.stack([u >= torch.quantile(u.flatten(), 1 - a) for u, a in zip(u4_, vm.float().mean((1, 2, 3)))])
dice_ = lambda P: np.array([seg_metrics(p.numpy(), g.numpy())['dice'] for p, g in zip(P, vm[:, 0])])
small_ = (vm.float().mean((1, 2, 3)) < .1).numpy()
mech = pd.DataFrame({k: {'all': d.mean(), f'small (<10%, n={small_.sum()})': d[small_].mean(), 'min': d.min()}
                     for k, d in (('TAEF2 latent channels', dice_(taef)), ('perfect 4x4 attention map', dice_(grid4)))}).T
assert mech.iloc[0, 0] > .98 and mech.iloc[1, 0] < .85 and mech.iloc[1, 1] < mech.iloc[1, 0] < mech.iloc[0, 0] - .1
mech.round(3)

# %% [markdown]
# ## The multi-objective loss
#
# Three terms, jointly optimised (`skindualgen_loss`, named in the config so the cache key holds its weights):
#
# - the **v loss on the image latents** (the base model's objective, weight 1);
# - the **v loss on the mask latents**, weight `mask`. Both halves are normalised to unit variance, so weight 1 would
#   treat a mask latent element like an image latent element; 2 (measured: consistency rose with it and with longer
#   training, up to the figure's steps: see the evaluation for twice as many) favours the mask, which the base model
#   has never seen;
# - a **mask-shape loss** (BCE + soft Dice, weight `shape`) on the mask decoded from the x̂0 estimate: x̂0 = √ᾱ·x_t −
#   √(1 − ᾱ)·v̂ on the mask half, decoded by TAEF2 without the final clamp (which would cut the gradient where it
#   saturates), mean over the three channels, times `tau` as logits. The target is the decoded clean mask latent,
#   thresholded at 0. It applies to at most `n` items per step whose t ≤ `tmax`, weighted by ᾱ_t: at larger t the
#   estimate carries little shape, and decoding costs more than the UNet step (so only a few items pay it).
#
# The shape weight is small because the term is a refinement, not the main signal: the v loss on the mask latents
# already carries the shape (TAEF2 round-trips masks almost exactly). What the term buys is measured by the figure's
# ablation (`shape=0`, the same steps and seed), and the figure reports it whichever way it falls; a ten times larger
# weight and half again as many steps were tried on the same consistency protocol and did not raise it (the issue's
# notes give those runs, which the figure does not repeat).

# %%
#| export
SHAPE_DEFAULTS = {'mask': 2.0, 'shape': 0.1, 'tmax': 300, 'n': 4, 'tau': 5.0}

def loss_name(**kw)->str:
    "The config's name of a SkinDualGen loss, e.g. 'skindualgen:mask=1.0,n=8,shape=0.1,tau=5.0,tmax=300'."
    w = {**SHAPE_DEFAULTS, **kw}; bad = set(w) - set(SHAPE_DEFAULTS)
    if bad: raise DermnbError(f"unknown SkinDualGen loss settings {sorted(bad)}; known: {sorted(SHAPE_DEFAULTS)}")
    return 'skindualgen:' + ','.join(f'{k}={w[k]:g}' for k in sorted(w))

def parse_loss(name:str)->dict:
    "The settings of a loss name made by `loss_name`."
    if not name.startswith('skindualgen:'): raise DermnbError(f"not a SkinDualGen loss: {name!r}")
    return {k: float(v) for k, v in (kv.split('=') for kv in name.split(':', 1)[1].split(','))}


# %%
#| export
def dice_bce(logits:torch.Tensor, # (B, H, W) mask logits
             target:torch.Tensor # (B, H, W) in {0, 1}
            )->torch.Tensor:
    "BCE + soft Dice per item (B,)."
    p = logits.sigmoid()
    dice = 1 - (2 * (p * target).flatten(1).sum(1) + 1) / (p.flatten(1).sum(1) + target.flatten(1).sum(1) + 1)
    return F.binary_cross_entropy_with_logits(logits, target, reduction='none').flatten(1).mean(1) + dice

def skindualgen_loss(name:str # the config's `loss` (`loss_name`)
                    )->Callable:
    "The trainer's loss function for a SkinDualGen config: image + mask v losses and the mask-shape loss."
    w = parse_loss(name)
    def loss_fn(model, bb, cfg, b, sl, acc):
        dev = acc.device
        x0, noise, t = b['x0'][sl].to(dev), b['noise'][sl].to(dev), b['t'][sl].to(dev)
        x_t = bb.scheduler.add_noise(x0, noise, t); v = bb.scheduler.get_velocity(x0, noise, t)
        with acc.autocast(): pred = unet_eps(model, x_t, t, b['cond'][sl].to(dev)).float()
        C = pred.shape[1] // 2
        loss = F.mse_loss(pred[:, :C], v[:, :C]) + w['mask'] * F.mse_loss(pred[:, C:], v[:, C:])
        if w['shape'] > 0:
            pick = torch.nonzero(t <= w['tmax']).flatten()[:int(w['n'])]
            if len(pick):
                ab = bb.scheduler.alphas_cumprod.to(dev)[t[pick]].view(-1, 1, 1, 1)
                x0_hat = ab.sqrt() * x_t[pick, C:] - (1 - ab).sqrt() * pred[pick, C:]
                dec = lambda z: bb.ae.ae.ae.decoder(z * bb.ae.scale[C:].view(1, -1, 1, 1) + bb.ae.shift[C:].view(1, -1, 1, 1))
                logits = w['tau'] * (dec(x0_hat).mean(1) * 2 - 1)
                with torch.no_grad(): target = (dec(x0[pick, C:]).mean(1) * 2 - 1 > 0).float()
                loss = loss + w['shape'] * (ab.flatten() * dice_bce(logits, target)).sum() / len(pred)
        return loss
    return loss_fn


# %%
test_eq(parse_loss(loss_name(shape=0.3)), {**SHAPE_DEFAULTS, 'shape': 0.3})
test_fail(lambda: loss_name(colour=1), contains='unknown SkinDualGen loss')
lg_, tg_ = torch.full((2, 8, 8), -10.), torch.zeros(2, 8, 8)
assert dice_bce(lg_, tg_).max() < .01 and dice_bce(-lg_, tg_).min() > 1.

# %% [markdown]
# ## The model
#
# **quick:** the cached base model widened by 32 channels, LoRA rank `LORA_RANK` on its attention and resnet
# convolutions (`dermnb.training.WIDE_LORA_TARGETS`) plus the widened input and output convolutions, `STEPS` steps of 32 pairs, on `taef2-dual` latents. **full:** Stable Diffusion 2 (base) widened by its 4
# VAE latent channels (the mask encoded by the SD VAE) with the same loss; the quick path is the one measured here.

# %%
#| export
LORA_RANK = 16
STEPS = 1200

def skindualgen_train_config(profile:str='quick', # run profile
                             shape:float=SHAPE_DEFAULTS['shape'], # weight of the mask-shape loss (0: the ablation)
                             caption_cfg:CaptionConfig=CaptionConfig(), # LesionGen's caption dataset (prompts)
                             seed:int=0 # seed
                            )->TrainConfig:
    "The SkinDualGen training config for a profile and a mask-shape weight."
    p = get_profile(profile); data = f"skindualgen:{'+'.join(PAIR_DATASETS)}:train:squash:captions-{caption_cfg.hash()}"
    if p.name == 'quick':
        return TrainConfig(data=data, space='latent', ae='taef2-dual', image_size=p.image_size, cond='text', text_encoder='minilm',
                           base=f'cached:{base_config(profile, 0).hash()}', widen=32, lora_rank=LORA_RANK, lora_alpha=LORA_RANK,
                           prediction_type='v_prediction', steps=STEPS, batch_size=32, lr=5e-4, warmup=50, ema_decay=0.99,
                           p_uncond=0.1, flip=True, loss=loss_name(shape=shape), max_minutes=3 * p.train_minutes,
                           ckpt_every=200, log_every=10, seed=seed)
    return TrainConfig(data=data.replace(':squash', ':512'), space='latent', ae='sd-dual:stabilityai/stable-diffusion-2-base',
                       image_size=512, cond='text', base='sd:stabilityai/stable-diffusion-2-base', widen=4, lora_rank=32,
                       steps=10000, batch_size=8, lr=1e-4, mixed_precision='bf16', loss=loss_name(shape=shape), seed=seed)


# %%
#| export
def pair_training_set(rows:Sequence[dict], # LesionGen caption rows
                      root:str|Path|None=None, # data root
                      size:int=64 # square side
                     )->PairDataset:
    "The training pairs: caption rows of PAIR_DATASETS (with ground-truth masks), with their rich captions."
    rows = [r for r in rows if r['source'] in PAIR_DATASETS and r['mask'] == 'ground truth']
    return PairDataset(caption_records(rows, root), {(r['source'], r['id']): r['captions'] for r in rows}, size)


# %%
#| export
def load_skindualgen(profile:str='quick', # run profile
                     shape:float=SHAPE_DEFAULTS['shape'], # mask-shape loss weight (0: the ablation)
                     root:str|Path|None=None, # data root
                     device:str='auto', # device
                     caption_cfg:CaptionConfig=CaptionConfig(), # prompts
                     seed:int=0, # seed
                     progress:bool=True # progress bars
                    )->Backbone:
    "The SkinDualGen backbone (base widened + LoRA), trained and cached on first use."
    cfg = skindualgen_train_config(profile, shape, caption_cfg, seed)
    if cfg.base.startswith('cached:'): load_base_model(profile, root, 0, device, progress)
    path = train_cached(cfg, lambda: pair_training_set(caption_dataset(caption_cfg, root, device, progress), root, cfg.image_size),
                        device=device, progress=progress, loss_fn=skindualgen_loss(cfg.loss))
    bb = load_trained(path, device); bb.cache_dir = path
    return bb


# %% [markdown]
# ## Generating pairs
#
# One sampling pass gives 2 × 32 latent channels; `split_pair` decodes them into the image and its mask (the mean of
# the decoded mask channels above 0, then its largest connected component with holes filled: every training mask is one
# lesion, and the cleanup removes the speckles the decoder leaves; it raised consistency a little, measured). `write_pairs` writes `SYN_xxxxxx.jpg` and `SYN_xxxxxx_segmentation.png` (0/255,
# the ISIC naming, so the data layer and `dermnb eval seg` read the folder directly), atomically, and flags masks that
# come out empty or cover (almost) the whole image in `flags.csv` beside them instead of keeping them silently.

# %%
#| export
FLAG_MIN, FLAG_MAX = 0.005, 0.95     # a generated mask is flagged below 0.5% or above 95% of the image

def clean_mask(m:np.ndarray # a binary mask
              )->np.ndarray:
    "The largest connected component, holes filled (one lesion per image, as in the training masks)."
    from scipy import ndimage as ndi
    lab, n = ndi.label(m)
    if n == 0: return np.asarray(m, bool)
    return ndi.binary_fill_holes(lab == (np.argmax(ndi.sum(m, lab, range(1, n + 1))) + 1))

def split_pair(x:torch.Tensor # decoded 6-channel samples (B, 6, H, W) in [-1, 1]
              )->tuple:
    "(images (B, 3, H, W) in [-1, 1], masks (B, H, W) bool): the mask is the decoded mask channels' mean > 0, cleaned."
    return x[:, :3], torch.from_numpy(np.stack([clean_mask(m) for m in (x[:, 3:].mean(1) > 0).cpu().numpy()]))

def mask_flag(m:np.ndarray # a generated mask
             )->str:
    "'' for a usable mask, else 'empty' or 'full'."
    f = float(np.asarray(m).mean())
    return 'empty' if f < FLAG_MIN else 'full' if f > FLAG_MAX else ''


# %%
#| export
def write_pairs(images:torch.Tensor, # (B, 3, H, W) in [-1, 1]
                masks:torch.Tensor, # (B, H, W) bool
                out_dir:str|Path, # output folder (created)
                prompts:Sequence[str], # the prompt of each pair
                start:int=0 # index of the first pair (SYN_<index>)
               )->pd.DataFrame:
    "Write SYN_xxxxxx.jpg + SYN_xxxxxx_segmentation.png pairs atomically; flags.csv lists empty / full masks."
    out = Path(out_dir); out.mkdir(parents=True, exist_ok=True); rows = []
    for k, (im, m, p) in enumerate(zip(images, masks, prompts)):
        sid = f'SYN_{start + k:06d}'
        save_image(tensor_to_image(im), out/f'{sid}.jpg'); save_image(m.cpu().numpy(), out/f'{sid}_segmentation.png')
        rows.append({'id': sid, 'prompt': p, 'lesion_fraction': float(m.float().mean()), 'flag': mask_flag(m.cpu().numpy())})
    t = pd.DataFrame(rows)
    flags = out/'flags.csv'
    old = pd.read_csv(flags) if flags.exists() else t.iloc[:0]
    kept = old[~old.id.isin(t.id)]                          # rows of earlier runs that this one does not overwrite
    allt = (pd.concat([kept, t], ignore_index=True) if len(kept) else t).sort_values('id')
    atomic_save(flags, lambda f: allt.to_csv(f, index=False))
    return t


# %%
with tempfile.TemporaryDirectory() as d:
    ims = torch.rand(3, 3, 16, 16) * 2 - 1; ms = torch.zeros(3, 16, 16, dtype=torch.bool); ms[0, 4:10, 4:10] = True; ms[2] = True
    t = write_pairs(ims, ms, d, ['a', 'b', 'c'])
    test_eq(t.flag.tolist(), ['', 'empty', 'full'])
    test_eq(sorted(p.name for p in Path(d).iterdir())[:3], ['SYN_000000.jpg', 'SYN_000000_segmentation.png', 'SYN_000001.jpg'])
    test_eq(load_mask(Path(d)/'SYN_000000_segmentation.png').sum(), 36)
    test_eq(pd.read_csv(Path(d)/'flags.csv').flag.fillna('').tolist(), ['', 'empty', 'full'])
    write_pairs(ims[:2], ms[1:], d, ['d', 'e'], start=2)                 # a second run: SYN_000002 rewritten, SYN_000003 added
    test_eq(pd.read_csv(Path(d)/'flags.csv').prompt.tolist(), ['a', 'b', 'd', 'e'])


# %%
#| export
def generate_pairs(bb:Backbone, # a SkinDualGen backbone
                   prompts:Sequence[str], # one prompt per pair
                   guidance_scale:float=3., # classifier-free guidance
                   steps:int=20, # DDIM steps
                   seed:int=0 # sampling seed
                  )->tuple:
    "Images (N, 3, S, S) in [-1, 1] and masks (N, S, S) for the prompts, from one sampling pass each."
    return split_pair(generate(bb, list(prompts), guidance_scale, steps, seed=seed))


# %%
#| export
def generate_skindualgen(bb:Backbone, # a SkinDualGen backbone
                         prompt:str, # the text prompt
                         n:int, # number of pairs
                         out_dir:str|Path, # output folder
                         seed:int=0, # sampling seed
                         guidance_scale:float=3., # guidance
                         steps:int=20 # DDIM steps
                        )->pd.DataFrame:
    "Generate n image/mask pairs for a prompt and write them (`write_pairs`); returns the flags table."
    if not isinstance(n, int) or n <= 0: raise DermnbError(f"n must be a positive number of pairs, not {n!r}")
    check_prompt(prompt)
    ims, ms = generate_pairs(bb, [prompt] * n, guidance_scale, steps, seed)
    return write_pairs(ims, ms, out_dir, [prompt] * n)


# %% [markdown]
# The path end to end on a tiny saved base model (16 px, seconds): widened, LoRA-trained on real pairs with the
# multi-objective loss, reloaded, and sampled into pairs on disk; an empty prompt and n ≤ 0 are refused.

# %%
from dermnb.diffusion import make_unet, make_scheduler, load_taef2, load_text_encoder
with tempfile.TemporaryDirectory() as d:
    tb = Backbone(make_unet('text', sample_size=2, in_channels=32, cross_attention_dim=384, block_out_channels=(32, 32), head_dim=16),
                  make_scheduler(prediction_type='v_prediction'), load_taef2(), load_text_encoder('minilm'), image_size=16)
    tb.ae.fit_scaling(torch.rand(4, 3, 16, 16) * 2 - 1); tb.save(Path(d)/'base')
    cfg_t = TrainConfig(data='sdg-test', space='latent', ae='taef2-dual', image_size=16, cond='text', base=str(Path(d)/'base'),
                        widen=32, lora_rank=4, prediction_type='v_prediction', steps=3, batch_size=4, lr=1e-3, warmup=1,
                        log_every=1, ema_decay=0., loss=loss_name(tmax=1000))
    pairs = PairDataset(recs6, {(r.source, r.id): 'dermoscopy of a nevus' for r in recs6}, 16)
    p_t = train_cached(cfg_t, lambda: pairs, device='cpu', root=Path(d)/'cache', progress=False, loss_fn=skindualgen_loss(cfg_t.loss))
    sdg = load_trained(p_t, 'cpu')
    flags = generate_skindualgen(sdg, lesiongen_prompt('nevus'), 2, Path(d)/'gen', steps=2)
    test_eq(len(flags), 2); assert (Path(d)/'gen'/'SYN_000001_segmentation.png').exists()
    test_fail(lambda: generate_skindualgen(sdg, ' ', 2, Path(d)/'gen'), contains='empty prompt')
    test_fail(lambda: generate_skindualgen(sdg, 'dermoscopy of a nevus', -1, Path(d)/'gen'), contains='positive number')
    from dermnb.metrics import eval_seg_folders
    test_eq(eval_seg_folders(Path(d)/'gen', Path(d)/'gen')['n'], 2)      # `dermnb eval seg` reads the pairs


# %% [markdown]
# ## Evaluation
#
# **Image–mask consistency.** The project's supervised U-Net segments each generated image; its Dice against the
# generated mask says whether the mask is the image's lesion. Empty and full masks are counted (and flagged). Both
# areas are kept, so a systematic size disagreement (masks smaller than the lesion the U-Net sees, say) shows as such;
# the figure also scores the same U-Net on real test images against their ground truth at the same size, the ceiling
# this judge allows.

# %%
#| export
def consistency(images:torch.Tensor, # generated images (N, 3, S, S) in [-1, 1]
                masks:torch.Tensor, # generated masks (N, S, S) bool
                net # a trained LesionUNet (`dermnb.segmenter.load_segmenter`)
               )->pd.DataFrame:
    "Per pair: Dice of the U-Net's segmentation of the generated image against the generated mask, both areas, the flag."
    from dermnb.segmenter import predict_proba
    ims = [tensor_to_image(x) for x in images]
    rows = []
    for m, p in zip(masks.cpu().numpy(), predict_proba(net, ims)):
        rows.append({'dice': seg_metrics(p > .5, m)['dice'], 'lesion_fraction': float(m.mean()),
                     'unet_fraction': float((p > .5).mean()), 'flag': mask_flag(m)})
    return pd.DataFrame(rows)


# %%
from dermnb.segmenter import LesionUNet, SegmenterConfig
jn = LesionUNet(pretrained=False, width=8).eval(); jn.cfg = SegmenterConfig(size=64, fit='squash')
ims_c = torch.rand(3, 3, 64, 64) * 2 - 1; ms_c = torch.zeros(3, 64, 64, dtype=torch.bool); ms_c[0, 10:30, 10:30] = True
ct = consistency(ims_c, ms_c, jn)
test_eq(ct.columns.tolist(), ['dice', 'lesion_fraction', 'unet_fraction', 'flag']); test_eq(ct.flag.tolist(), ['', 'empty', 'empty'])
test_close(ct.lesion_fraction[0], 400 / 64**2); assert ct.dice.between(0, 1).all() and ct.unet_fraction.between(0, 1).all()

# %% [markdown]
# **Would longer training raise consistency?** It falls short on small lesions, where the generated image shows a halo
# that the U-Net reads as lesion, so image quality looked like the lever. `benchmarks/skindualgen_train_steps.py`
# trains the figure's config for twice the steps and scores both on prompts from the ISIC 2018 *validation* captions
# (the figure's protocol otherwise; the figure itself uses test captions). Twice the training lowers consistency,
# most of all on small lesions: the model is not undertrained at the figure's step count, and the figure keeps it.

# %%
from dermnb.core import results_csv
st_ = results_csv('benchmarks/results/skindualgen_train_steps.csv')
by_ = st_.groupby('steps').dice.mean(); sm_ = st_[st_.lesion_fraction < .1].groupby('steps').dice.mean()
assert by_[2 * STEPS] < by_[STEPS] and sm_[2 * STEPS] < sm_[STEPS] and sm_[STEPS] < by_[STEPS] - .15
pd.DataFrame({'consistency (val captions)': by_, 'lesions under 10%': sm_, 'train_s': st_.groupby('steps').train_s.first()}).round(3)


# %% [markdown]
# **Augmentation, the paper's claim.** Segmentation: the project's U-Net recipe trained on a fraction of the real
# ISIC 2018 training pairs, with or without as many synthetic pairs again, for the same number of optimizer steps
# (the same CPU budget per arm), scored on the real ISIC 2018 test split. Classification: melanoma / nevus /
# seborrheic keratosis (ISIC 2017 labels) on frozen EfficientNet-Lite0 features with a balanced linear head (as in
# LesionGen's claim), real-only vs real + class-balanced synthetic images, at the same fractions, scored on the ISIC
# 2018 Task 1 test split's labelled images.

# %%
#| export
@dataclass(frozen=True)
class AugSegConfig(Config):
    "A short, fixed-budget U-Net training for the augmentation arms (hashed for the cache)."
    size:int=64                   # square side
    steps:int=150                 # optimizer steps (the same for every arm)
    batch_size:int=16             # images per step
    lr:float=2e-3                 # AdamW
    width:int=16                  # decoder width
    fraction:float=1.0            # share of the real training pairs
    synthetic:int=0               # synthetic pairs added (0 = real only)
    seed:int=0                    # data order, subsample and init

def train_aug_segmenter(cfg:AugSegConfig, # the arm
                        real:torch.utils.data.Dataset, # real pairs: items with 'image' (3,S,S) and 'mask' (1,S,S)
                        syn_images:torch.Tensor|None=None, # synthetic images (N, 3, S, S) in [-1, 1]
                        syn_masks:torch.Tensor|None=None # their masks (N, S, S)
                       ):
    "Train a LesionUNet for a fixed number of steps on a real fraction (+ synthetic pairs); returns the net."
    from dermnb.segmenter import LesionUNet, seg_loss
    torch.manual_seed(cfg.seed); g = np.random.default_rng(cfg.seed)
    idx = g.permutation(len(real))[:max(1, int(round(cfg.fraction * len(real))))]
    X = torch.stack([real[i]['image'] for i in idx]); M = torch.stack([real[i]['mask'] for i in idx])
    if cfg.synthetic:
        X = torch.cat([X, syn_images[:cfg.synthetic].float()]); M = torch.cat([M, syn_masks[:cfg.synthetic, None].float()])
    net = LesionUNet(True, cfg.width); opt = torch.optim.AdamW(net.parameters(), cfg.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=cfg.steps, pct_start=.15)
    gen = torch.Generator().manual_seed(cfg.seed); net.train()
    for s in range(cfg.steps):
        b = torch.randint(len(X), (cfg.batch_size,), generator=gen)
        x, m = X[b], M[b]
        if s % 2: x, m = x.flip(-1), m.flip(-1)
        loss = seg_loss(net(x), m); opt.zero_grad(); loss.backward(); opt.step(); sched.step()
    return net.eval()


# %%
#| export
@torch.no_grad()
def seg_scores(net, # a LesionUNet
               test:torch.utils.data.Dataset # items with 'image' and 'mask' at the net's training size
              )->dict:
    "Mean Dice and IoU on a test set (at the training size)."
    d, j = [], []
    for i in range(0, len(test), 32):
        items = [test[k] for k in range(i, min(len(test), i + 32))]
        p = net(torch.stack([it['image'] for it in items])).sigmoid()[:, 0].numpy() > .5
        for pm, it in zip(p, items):
            s = seg_metrics(pm, it['mask'][0].numpy() > .5); d.append(s['dice']); j.append(s['jaccard'])
    return {'dice': float(np.mean(d)), 'iou': float(np.mean(j))}


# %% [markdown]
# **Which synthetic pairs to add.** A generated pair whose mask misses its lesion teaches the segmenter the wrong
# boundary. `agreement` lets an arm's own real-only segmenter (trained on the same real fraction, so no other real data
# enters the arm) score each synthetic pair by the Dice between its prediction and the generated mask, and
# `select_synthetic` keeps the n pairs it agrees with most. The figure reports the unfiltered hybrid beside it.
#
# Measured while designing this, on ISIC 2018 *validation* (n = 255) at 10% real data, 3 seeds, 200 steps: Dice gain
# over real only +0.004 ± 0.017 for the filtered arm. Tried and not kept: ignoring a 2-pixel band around each synthetic
# mask's boundary (where generated masks and images disagree most) +0.003 ± 0.016, synthetic pixels at half weight
# +0.001 ± 0.016, only the better half of the selected pairs −0.007 ± 0.040, all pairs with the boundary band ignored
# +0.004 ± 0.020. The seed-to-seed spread of one arm (about 0.016) is four times any of these gains.

# %% [markdown]
# **More synthetic pairs per real one?** The arms add as many synthetic pairs as real ones. At 10% real data,
# `benchmarks/skindualgen_synthetic_ratio.py` sets real only against one and three times as many synthetic pairs (a
# pool the figure does not use; the arms as the figure trains them), on the *validation* split. Three times as many
# lowers Dice more than one: the synthetic pairs' errors add up rather than average out, so the figure keeps 1×.

# %%
ra_ = results_csv('benchmarks/results/skindualgen_synthetic_ratio.csv').groupby('ratio').gain.agg(['mean', 'std'])
assert ra_.loc[3, 'mean'] < ra_.loc[1, 'mean'] <= 0 and abs(ra_.loc[1, 'mean']) < ra_.loc[1, 'std']
ra_.round(4)


# %%
#| export
@torch.no_grad()
def agreement(net, # a LesionUNet, at the synthetic pairs' size
              syn_images:torch.Tensor, # synthetic images (N, 3, S, S) in [-1, 1]
              syn_masks:torch.Tensor # their masks (N, S, S)
             )->np.ndarray:
    "Per pair: Dice between the net's segmentation of the image and the generated mask (N,)."
    p = torch.cat([net(syn_images[k:k + 64].float()).sigmoid()[:, 0] for k in range(0, len(syn_images), 64)]).numpy() > .5
    return np.array([seg_metrics(a, b)['dice'] for a, b in zip(p, syn_masks.cpu().numpy())])

def select_synthetic(agree:np.ndarray, # per-pair agreement (`agreement`)
                     n:int # how many to keep
                    )->torch.Tensor:
    "Indices of the n pairs with the highest agreement, best first (ties in index order)."
    return torch.from_numpy(np.argsort(-np.asarray(agree), kind='stable')[:n].copy())


# %% [markdown]
# **One arm, cached.** `aug_seg_arm` trains an arm, scores it on the held-out real pairs and, given a pool of synthetic
# pairs, records its agreement with each (what the filtered arm of the same fraction and seed selects by). Its result
# is cached under `skindualgen-aug`, keyed by the arm's config and the content of every tensor it saw (real, test,
# synthetic and pool pairs), so a rerun of the figure with the same models trains nothing, and a new model's pairs
# can never be read from an old entry. Each result keeps its training time: the arms of one fraction get the same steps,
# and the times show what that costs.

# %%
#| export
def _pairs_tensors(ds)->tuple:
    "Stacked (images, masks) of a pair dataset."
    items = [ds[k] for k in range(len(ds))]
    return torch.stack([it['image'] for it in items]), torch.stack([it['mask'] for it in items])

def aug_seg_arm(cfg:AugSegConfig, # the arm
                real:torch.utils.data.Dataset, # real training pairs (items with 'image' and 'mask')
                test:torch.utils.data.Dataset, # held-out real pairs it is scored on
                syn_images:torch.Tensor|None=None, # synthetic images added (their first `cfg.synthetic`)
                syn_masks:torch.Tensor|None=None, # their masks
                pool:tuple|None=None, # (images, masks): synthetic pairs to score the net's agreement with
                cache:bool=True # read and write the result cache
               )->dict:
    "{'dice', 'iou', 'train_s', 'agreement' (array or None)} of one augmentation arm; cached by config and content."
    syn = (syn_images[:cfg.synthetic], syn_masks[:cfg.synthetic]) if cfg.synthetic else (None, None)
    def run(d=None):
        t0 = time.time(); net = train_aug_segmenter(cfg, real, syn_images, syn_masks); train_s = time.time() - t0
        res = {**seg_scores(net, test), 'train_s': train_s, 'agreement': None if pool is None else agreement(net, *pool).tolist()}
        if d is not None: (d/'result.json').write_text(json.dumps(res))
        return res
    if not cache: res = run()
    else:
        key = {'cfg': cfg, 'real': tensor_hash(*_pairs_tensors(real)), 'test': tensor_hash(*_pairs_tensors(test)),
               'synthetic': tensor_hash(*syn), 'pool': tensor_hash(*pool) if pool is not None else None}
        res = json.loads((cached_dir('skindualgen-aug', key, run)/'result.json').read_text())
    return {**res, 'agreement': None if res['agreement'] is None else np.asarray(res['agreement'])}


# %%
real_t = DermDataset(recs6, 32, 'squash')
net_t = train_aug_segmenter(AugSegConfig(size=32, steps=2, batch_size=4, width=8, fraction=.5), real_t,
                            torch.rand(2, 3, 32, 32) * 2 - 1, torch.zeros(2, 32, 32, dtype=torch.bool))
sc = seg_scores(net_t, real_t); assert 0 <= sc['dice'] <= 1 and 0 <= sc['iou'] <= 1
ag_t = agreement(net_t, torch.rand(3, 3, 32, 32) * 2 - 1, torch.zeros(3, 32, 32, dtype=torch.bool))
test_eq(ag_t.shape, (3,)); assert ((0 <= ag_t) & (ag_t <= 1)).all()
test_eq(select_synthetic(np.array([.2, .9, .2, .5]), 3).tolist(), [1, 3, 0])
import os
from unittest.mock import patch
with tempfile.TemporaryDirectory() as d, patch.dict(os.environ, {'DERMNB_CACHE': d}):
    pool_t = (torch.rand(3, 3, 32, 32) * 2 - 1, torch.zeros(3, 32, 32, dtype=torch.bool))
    c_t = AugSegConfig(size=32, steps=2, batch_size=4, width=8, fraction=.5, synthetic=2)
    a1 = aug_seg_arm(c_t, real_t, real_t, *pool_t, pool=pool_t)
    a2 = aug_seg_arm(c_t, real_t, real_t, *pool_t, pool=pool_t)           # a cache hit: the same result, no training
    test_eq(a1['dice'], a2['dice']); test_eq(a1['train_s'], a2['train_s']); test_eq(a2['agreement'].shape, (3,))
    test_eq(len(list((Path(d)/'skindualgen-aug').iterdir())), 1)
    aug_seg_arm(c_t, real_t, real_t, pool_t[0] * 0, pool_t[1], pool=pool_t)  # other synthetic pixels: a new entry
    test_eq(len(list((Path(d)/'skindualgen-aug').iterdir())), 2)
    assert aug_seg_arm(AugSegConfig(size=32, steps=2, batch_size=4, width=8), real_t, real_t)['agreement'] is None
