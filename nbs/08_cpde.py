# %% [markdown]
# # CPDE
#
# > Context-preserving dermoscopic attribute editing: an h-space edit (Asyrp-style) whose residual comes from one
# > learned semantic module (SCT) for every attribute and direction, trained mask-guided (L1 outside the lesion,
# > directional CLIP loss inside it), with background blending at sampling; its Asyrp and DiffusionCLIP baselines.
#
# Seed paper: *Context-Preserving Dermoscopic Editing: Mask-Guided Lesion-Aware Diffusion for Attribute Modification*.
# Baselines as their official code does them: kwonminki/Asyrp_official (the DeltaBlock, the asymmetric reverse step,
# the loss and the LPIPS rule for t_edit) and gwang-kim/DiffusionCLIP (fine-tuning the denoiser with the directional
# CLIP loss). No CPDE code is public: the SCT design below is ours, drawn to the paper's description.
#
# Generic parts come from earlier notebooks: DDIM inversion and the h-space hook (`dermnb.diffusion`), the base model
# (`dermnb.base`), the directional CLIP loss and S_dir (`dermnb.clip`), the concept-aware DermCLIP and the concept
# classifier (`dermnb.lesiongen`), NS-LPIPS and FID (`dermnb.metrics`), the U-Net (`dermnb.segmenter`).
#
# **Scaled to our backbone, and how.** Asyrp edits the 512×8×8 mid-block output of a 256-px pixel DDPM; our quick base
# is a 4.3M-parameter text-conditional UNet on 32×8×8 TAEF2 latents of 64-px images, whose mid-block output h is
# 128×4×4 with a 256-d time embedding. The DeltaBlock keeps its layers at C = 128. The official scripts' schedule
# (`--n_inv_step 40 --n_train_step 40 --n_test_step 40`, t_edit 500, t_addnoise 200) keeps its 40 DDIM steps (an
# earlier version used the base model's 20-step sampling grid; on the validation split the 40-step inversion
# reconstructs better, see `EDIT_STEPS`), and t_edit
# and t_addnoise come from Asyrp's LPIPS rule measured on our backbone (below; its η = 1 "quality boosting" below
# t_addnoise is kept, as the official code does it, and what it costs here is measured: `QUALITY_BOOST`). Asyrp
# trains 12,500 SGD steps per edit at batch 1; the quick profile affords a few dozen batched steps per method, so the
# learning rates are raised and the optimiser is Adam (stated with each).

# %%
#| default_exp cpde

# %%
#| export
from __future__ import annotations
import copy, functools, json, math, time, warnings
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
from diffusers import DDIMScheduler
from dermnb.core import (Config, DermnbError, DataError, cached_dir, tensor_hash, get_profile, load_image, load_mask, save_image,
                         image_to_tensor, tensor_to_image, image_files, get_device, save_json, data_root)
from dermnb.data import Record, get_split, DermDataset, fit_square
from dermnb.metrics import ns_lpips, perceptual_distance, seg_metrics
from dermnb.diffusion import Backbone, ddim_invert, hspace_hook, to_eps, add_lora
from dermnb.clip import ClipEncoder, text_direction, clip_direction_similarity, directional_clip_loss
from dermnb.lesiongen import CONCEPTS

# %%
import tempfile, dataclasses
from fastcore.test import test_eq, test_ne, test_fail, test_close
from dermnb.core import data_root, make_generator
torch.set_num_threads(2)
ROOT = data_root()

# %% [markdown]
# ## The edits
#
# The attributes are the clinically meaningful structures Derm7pt and PH2 annotate. An edit is an attribute and a
# direction: *add* moves "dermoscopy of a skin lesion" towards "dermoscopy of a skin lesion with {attribute}", *remove*
# the other way (small text encoders read negations poorly, so "without" is not used). An unknown attribute is an error
# that lists the known ones.

# %%
#| export
ATTRIBUTES = {'streaks': 'streaks', 'blue_whitish_veil': 'blue_whitish_veil', 'pigment_network': 'atypical_pigment_network',
              'dots_and_globules': 'irregular_dots_globules', 'regression_structures': 'regression_structures'}  # -> CONCEPTS key
DIRECTIONS = ('add', 'remove')
PLAIN = 'dermoscopy of a skin lesion'

@dataclass(frozen=True)
class Edit:
    "An attribute edit: which attribute, which direction."
    attribute:str   # one of ATTRIBUTES
    direction:str   # 'add' or 'remove'

    def __post_init__(self):
        if self.attribute not in ATTRIBUTES:
            raise DermnbError(f"unknown attribute {self.attribute!r}; known attributes: {', '.join(ATTRIBUTES)}")
        if self.direction not in DIRECTIONS: raise DermnbError(f"direction must be 'add' or 'remove', not {self.direction!r}")

    @property
    def concept(self)->str: return ATTRIBUTES[self.attribute]
    @property
    def texts(self)->tuple:
        "(source, target) descriptions."
        w = f"{PLAIN} with {CONCEPTS[self.concept][0]}"
        return (PLAIN, w) if self.direction == 'add' else (w, PLAIN)
    @property
    def name(self)->str: return f'{self.direction} {self.attribute}'

ALL_EDITS = tuple(Edit(a, d) for a in ATTRIBUTES for d in DIRECTIONS)

# %%
e = Edit('streaks', 'add'); test_eq(e.texts, ('dermoscopy of a skin lesion', 'dermoscopy of a skin lesion with streaks'))
test_eq(Edit('streaks', 'remove').texts[::-1], e.texts); test_eq(len(ALL_EDITS), 10)
test_fail(lambda: Edit('sparkles', 'add'), contains='known attributes: streaks, blue_whitish_veil')


# %% [markdown]
# ## Images and lesion masks
#
# Edits run at the backbone's size (64 px, squashed as the base model was trained). Masks come from the dataset where
# it has them (PH2), else from a segmenter: `diffseg-distilled` (DiffSeg's weakly supervised student: the "DiffSeg
# masks drive CPDE" path), or the supervised U-Net; every table names the source. The latent
# mask is the 8×8 max-pool of the 64-px mask: any lesion pixel makes its cell editable, so an edit is not clipped.

# %%
#| export
def segment_masks(images:Sequence[Image.Image], # PIL images
                  method:str='unet', # 'unet' or 'diffseg-distilled'
                  profile:str='quick', # which trained segmenter
                  root:str|Path|None=None, # data root (training on a cache miss)
                  device:str='auto' # device
                 )->list:
    "Lesion masks (bool, each image's size) from the project's segmenters."
    if method == 'diffseg-distilled':
        from dermnb.diffseg import load_distilled, distilled_method
        return [r['mask'] for r in distilled_method(load_distilled(profile, root, device))(images)]
    if method != 'unet': raise DermnbError(f"unknown mask method {method!r}; use 'unet' or 'diffseg-distilled'")
    from dermnb.segmenter import load_segmenter, predict_proba, SegmenterConfig
    net = load_segmenter(SegmenterConfig.for_profile(profile), root, device)
    return [p > .5 for p in predict_proba(net, list(images))]


# %%
#| export
@dataclass
class EditSet:
    "Images to edit at the backbone's size, their lesion masks, and where the masks came from."
    ids:list                    # image ids
    images:torch.Tensor         # (N, 3, S, S) in [-1, 1]
    masks:torch.Tensor          # (N, 1, S, S) in {0, 1}
    mask_source:list            # per image: 'ground truth', 'unet' or 'diffseg-distilled'
    labels:pd.DataFrame|None=None # concept labels (0/1/None) where experts rated them

    def __len__(self): return len(self.ids)
    def latent_masks(self, factor:int=8)->torch.Tensor:
        "The editable latent cells: max-pool of the masks by the AE's factor."
        return F.max_pool2d(self.masks, factor)
    def subset(self, idx)->'EditSet':
        idx = list(idx)
        return EditSet([self.ids[i] for i in idx], self.images[idx], self.masks[idx], [self.mask_source[i] for i in idx],
                       self.labels.iloc[idx].reset_index(drop=True) if self.labels is not None else None)


# %%
#| export
def edit_set(records:Sequence[Record], # PH2 / Derm7pt (or any) records
             size:int=64, # the backbone's image size
             mask_method:str='unet', # segmenter for records without a ground-truth mask
             profile:str='quick', # segmenter profile
             root:str|Path|None=None, # data root
             device:str='auto' # device
            )->EditSet:
    "An `EditSet` of records: squashed images, ground-truth masks where present, segmenter masks otherwise."
    from dermnb.lesiongen import concept_labels
    ims = [load_image(r.image) for r in records]
    need = [i for i, r in enumerate(records) if r.mask is None]
    seg = dict(zip(need, segment_masks([ims[i] for i in need], mask_method, profile, root, device))) if need else {}
    X, M, src = [], [], []
    for i, (r, im) in enumerate(zip(records, ims)):
        m = load_mask(r.mask, size=im.size) if r.mask is not None else seg[i]
        X.append(image_to_tensor(fit_square(im, size, 'squash')))
        M.append(torch.from_numpy(np.asarray(fit_square(Image.fromarray(m), size, 'squash', is_mask=True)) > 0).float()[None])
        src.append('ground truth' if r.mask is not None else mask_method)
    return EditSet([r.id for r in records], torch.stack(X), torch.stack(M), src, pd.DataFrame([concept_labels(r) for r in records]))


# %%
ph2_few = get_split('ph2', 'test', ROOT)[:3]
es = edit_set(ph2_few)
test_eq((es.images.shape, es.masks.shape), ((3, 3, 64, 64), (3, 1, 64, 64))); test_eq(es.mask_source, ['ground truth'] * 3)
test_eq(es.latent_masks().shape, (3, 1, 8, 8)); assert (es.latent_masks() >= F.avg_pool2d(es.masks, 8)).all()
test_eq(len(es.subset([0, 2])), 2); test_fail(lambda: segment_masks([], 'magic'), contains='unknown mask method')


# %% [markdown]
# ## Sampling with an edited h: the asymmetric reverse step
#
# Asyrp's step, as its code does it: at every t ≥ t_edit the UNet runs twice on the same x_t, once plainly (ε) and once
# with Δh added to its mid-block output (ε_edit, via the backbone's `hspace_hook`). x̂0 is predicted from the *edited*
# output, while the DDIM direction term keeps the *original* ε:
# x_{t'} = √ᾱ_{t'}·x̂0(ε_edit) + √(1 − ᾱ_{t'} − σ²)·ε + σ·z, with σ from η. Below `t_addnoise` the official code
# samples with η = 1 (its "quality boosting"); above it, η = 0. Both calls go into one batch of 2B. `blend(i, x)`
# replaces the sample after each step (CPDE puts the inverted background back there). The UNet's output can be noise
# or v: x̂0 and ε are computed for its prediction type without dividing by √ᾱ (0.0076 at t = 981 here).

# %%
#| export
def _x0_eps(out:torch.Tensor, x:torch.Tensor, t:int, sch)->tuple:
    "(x̂0, ε) of a UNet output at x_t, for epsilon- or v-prediction."
    ab = sch.alphas_cumprod[t].to(x); a, s = ab.sqrt(), (1 - ab).sqrt()
    if sch.config.prediction_type == 'v_prediction': return a * x - s * out, a * out + s * x
    if sch.config.prediction_type == 'epsilon': return (x - s * out) / a, out
    raise DermnbError(f"prediction type {sch.config.prediction_type!r} is not supported here")

def asym_ddim(bb:Backbone, # the backbone (its UNet is not changed)
              x_T:torch.Tensor, # starting latents (B, C, h, w), e.g. DDIM-inverted
              steps:int=20, # DDIM steps (the inversion's)
              delta:Callable|None=None, # Δh = delta(h, t) for the edited call; None = plain DDIM
              t_edit:int=0, # Δh from this timestep up
              t_addnoise:int=0, # η = 1 below this timestep (edited runs only)
              blend:Callable|None=None, # f(i, x) -> x after step i (e.g. background blending)
              generator:torch.Generator|None=None, # for the η = 1 noise
              unet:nn.Module|None=None, # a different denoiser (DiffusionCLIP's fine-tuned one); default bb.unet
              start:int=0, # first step index (x_T is the sample at timesteps[start])
              record:bool=False, # also return the x̂0 of every step
              grad:bool=False, # keep the graph through the whole pass (DiffusionCLIP training)
              h_block:str='mid_block' # the UNet block whose output Δh is added to
             ):
    "DDIM from x_T with Asyrp's asymmetric step where Δh is on; returns x_0 (and the per-step x̂0 if `record`)."
    unet = unet or bb.unet; sch = DDIMScheduler.from_config(bb.scheduler.config); sch.set_timesteps(steps)
    B = x_T.shape[0]; null = bb.null(B); x = x_T.to(bb.device); x0s = []
    with torch.set_grad_enabled(grad):
        for i in range(start, len(sch.timesteps)):
            t = int(sch.timesteps[i]); tp = t - sch.config.num_train_timesteps // steps
            abp = sch.alphas_cumprod[tp] if tp >= 0 else sch.final_alpha_cumprod
            if delta is not None and t >= t_edit:
                d2 = lambda h, tt: torch.cat([torch.zeros_like(h[:B]), delta(h[B:], tt[B:])])
                with hspace_hook(unet, delta=d2, record=False, block=h_block):
                    out = unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([null, null])).sample
                x0, _ = _x0_eps(out[B:], x, t, sch); _, eps = _x0_eps(out[:B], x, t, sch)
                eta = 1. if t < t_addnoise else 0.
            else:
                out = unet(x, t, encoder_hidden_states=null).sample
                x0, eps = _x0_eps(out, x, t, sch); eta = 1. if (delta is not None and t < t_addnoise) else 0.
            ab = sch.alphas_cumprod[t]
            sigma = eta * ((1 - abp) / (1 - ab)).sqrt() * (1 - ab / abp).sqrt()
            x = abp.sqrt() * x0 + (1 - abp - sigma ** 2).clamp_min(0).sqrt() * eps
            if sigma > 0: x = x + sigma * torch.randn(x.shape, generator=generator).to(x)
            if blend is not None: x = blend(i, x)
            if record: x0s.append(x0)
    return (x, x0s) if record else x


# %% [markdown]
# With no Δh, `asym_ddim` is plain DDIM (it equals the backbone's sampler), and from a DDIM-inverted x_T it
# reconstructs; a Δh changes the result only where it is on.

# %%
from dermnb.diffusion import make_unet, make_scheduler, ddim_sample
tb = Backbone(make_unet('text', sample_size=8, in_channels=4, cross_attention_dim=12, block_out_channels=(32, 32), head_dim=8),
              make_scheduler(prediction_type='v_prediction'), None, lambda caps: torch.zeros(len(caps), 3, 12), image_size=8)
xT = torch.randn(2, 4, 8, 8, generator=make_generator(0))
with torch.no_grad():
    test_close(asym_ddim(tb, xT, 10), ddim_sample(tb.unet, tb.scheduler, x_T=xT, cond=tb.null(2), steps=10), eps=1e-5)
    ed = asym_ddim(tb, xT, 10, delta=lambda h, t: torch.ones_like(h), t_edit=500)
    assert (ed - asym_ddim(tb, xT, 10)).abs().max() > 1e-3
    late = asym_ddim(tb, xT, 10, delta=lambda h, t: torch.ones_like(h), t_edit=2000)     # never on: unchanged
    test_close(late, asym_ddim(tb, xT, 10), eps=1e-6)


# %% [markdown]
# ## DDIM inversions, cached per image
#
# Every method starts from the same DDIM inversion of the real image (null caption, no guidance, the sampling grid's
# steps), and CPDE blends its background back from it. The *reconstruction branch* of the dual-branch training, plain
# DDIM from the inverted x_T, is computed once too: its x̂0 at every step is what the edited branch is compared with
# outside the lesion. None of it depends on the editor, so it is cached per (backbone, image set, steps) and shared
# by every method, edit and epoch.

# %%
#| export
@dataclass
class Inversion:
    "DDIM inversions of an image set: the trajectory (sampling order) and the reconstruction branch's x̂0 per step."
    traj:torch.Tensor     # (S+1, N, C, h, w): traj[0] = x_T ... traj[S] = x_0 (the encoded image)
    rec_x0:torch.Tensor   # (S, N, C, h, w): x̂0 of plain DDIM from x_T at each step
    timesteps:list        # the S sampling timesteps
    steps:int             # S

    def subset(self, idx)->'Inversion':
        idx = list(idx); return Inversion(self.traj[:, idx], self.rec_x0[:, idx], self.timesteps, self.steps)


# %%
#| export
@torch.no_grad()
def invert(bb:Backbone, # the backbone
           images:torch.Tensor, # (N, 3, S, S) in [-1, 1]
           steps:int=20, # DDIM steps
           batch_size:int=32 # images per call
          )->Inversion:
    "DDIM-invert images (null caption) and run the reconstruction branch."
    trs, recs = [], []
    for b in images.split(batch_size):
        z0 = bb.encode(b.to(bb.device)); n = len(b)
        _, traj = ddim_invert(bb.unet, bb.scheduler, z0, cond=bb.null(n), steps=steps, return_trajectory=True)
        _, x0s = asym_ddim(bb, traj[0], steps, record=True)
        trs.append(torch.stack(traj).cpu()); recs.append(torch.stack(x0s).cpu())
    sch = DDIMScheduler.from_config(bb.scheduler.config); sch.set_timesteps(steps)
    return Inversion(torch.cat(trs, 1), torch.cat(recs, 1), [int(t) for t in sch.timesteps], steps)

def cached_inversion(bb:Backbone, # the backbone (its `cache_dir` names it in the key)
                     es:EditSet, # the images
                     steps:int=20 # DDIM steps
                    )->Inversion:
    "`invert`, cached by the backbone, the image ids and pixels, and the steps."
    key = {'backbone': str(getattr(bb, 'cache_dir', 'unnamed')), 'ids': es.ids, 'steps': steps, 'pixels': tensor_hash(es.images)}
    def build(d):
        inv = invert(bb, es.images, steps); torch.save({'traj': inv.traj, 'rec_x0': inv.rec_x0, 'timesteps': inv.timesteps}, d/'inversion.pt')
    t = torch.load(cached_dir('cpde-inversion', key, build)/'inversion.pt')
    return Inversion(t['traj'], t['rec_x0'], t['timesteps'], steps)


# %%
with tempfile.TemporaryDirectory() as d:
    import os; os.environ['DERMNB_CACHE'] = d
    tb_img = Backbone(tb.unet, tb.scheduler, None, tb.text_encoder, image_size=8)
    tb_img.unet = make_unet('text', sample_size=8, in_channels=3, cross_attention_dim=12, block_out_channels=(32, 32), head_dim=8)
    tiny_es = EditSet(['a', 'b'], torch.rand(2, 3, 8, 8) * 2 - 1, torch.ones(2, 1, 8, 8), ['x', 'x'])
    inv = cached_inversion(tb_img, tiny_es, steps=10); inv2 = cached_inversion(tb_img, tiny_es, steps=10)
    del os.environ['DERMNB_CACHE']
test_eq((inv.traj.shape, inv.rec_x0.shape, len(inv.timesteps)), ((11, 2, 3, 8, 8), (10, 2, 3, 8, 8), 10))
test_eq(inv.traj[-1], tiny_es.images); test_eq(inv2.traj, inv.traj)            # the cache returns the same
test_eq(inv.subset([1]).traj.shape[1], 1)

# %% [markdown]
# ## Choosing t_edit and t_addnoise: Asyrp's LPIPS rule on our backbone
#
# Asyrp edits from T down to t_edit, the first timestep (going down) where the predicted x̂0 has come close enough to
# the image: the smallest t with LPIPS(x̂0_t, x0) ≥ 0.33 · cos(source, target) on its AlexNet LPIPS, and adds noise
# below t_addnoise, the smallest t with LPIPS(x_t, x0) ≥ 1.2. AlexNet's LPIPS weights are not available offline, so
# we measure the same two curves with `effnet_lpips_uncalibrated` and use the official thresholds *as fractions of each
# curve's rise from its floor to its plateau at t = T*, the fractions they are on Asyrp's shipped CelebA curves (0.29
# for x̂0, 0.86 for x_t). The floor matters here: Asyrp's pixel DDPM reconstructs almost exactly at t → 0, while our
# latent model's x̂0 keeps the autoencoder's and the inversion's error there (measured: without subtracting it, the rule
# put t_edit at the last step). x_t is the image noised in pixel space, as Asyrp measures it. The cosine is DermCLIP's
# between the edit's texts.

# %%
#| export
X0_FRACTION, XT_FRACTION = 0.29, 0.86   # Asyrp's thresholds as fractions of the t = T plateau (its CelebA curves)

@torch.no_grad()
def lpips_curves(bb:Backbone, # the backbone
                 es:EditSet, # images (a few dozen suffice)
                 inv:Inversion # their inversions
                )->pd.DataFrame:
    "Per sampling timestep: mean perceptual distance of the reconstruction's x̂0 and of the pixel-noised image to the image."
    x = (es.images.float() + 1) / 2; rows = []; g = torch.Generator().manual_seed(0)
    for i, t in enumerate(inv.timesteps):
        dec = (bb.decode(inv.rec_x0[i].to(bb.device)).cpu().float() + 1) / 2
        ab = bb.scheduler.alphas_cumprod[t]
        noisy = (ab.sqrt() * (x * 2 - 1) + (1 - ab).sqrt() * torch.randn(x.shape, generator=g) + 1) / 2
        rows.append({'t': t, 'd_x0': float(perceptual_distance(x, dec.clamp(0, 1)).mean()),
                     'd_xt': float(perceptual_distance(x, noisy.clamp(0, 1)).mean())})
    return pd.DataFrame(rows)

def choose_t(curves:pd.DataFrame, # from `lpips_curves`
             cos:float=1. # text cosine of the edit's source and target
            )->dict:
    "t_edit and t_addnoise by Asyrp's rule (fractions of the plateau), with the ratios that chose them."
    c = curves.sort_values('t'); top = c.iloc[-1]
    rise = lambda d: (d - d.min()) / max(d.iloc[-1] - d.min(), 1e-12)
    r0, rx = rise(c.d_x0), rise(c.d_xt)
    te = c.t[r0 >= X0_FRACTION * cos]; ta = c.t[rx >= XT_FRACTION]
    return {'t_edit': int(te.min()) if len(te) else int(top.t), 't_addnoise': int(ta.min()) if len(ta) else 0,
            'x0_fraction': X0_FRACTION * cos, 'xt_fraction': XT_FRACTION}


# %%
cv = pd.DataFrame({'t': [1, 251, 501, 751, 951], 'd_x0': [0., .1, .3, .8, 1.], 'd_xt': [0., .5, .85, .95, 1.]})
test_eq(choose_t(cv), {'t_edit': 501, 't_addnoise': 751, 'x0_fraction': .29, 'xt_fraction': .86})
test_eq(choose_t(cv, cos=.3)['t_edit'], 251)
test_eq(choose_t(cv.assign(d_x0=cv.d_x0 * .5 + .4))['t_edit'], 501)                # a floor does not move the choice


# %% [markdown]
# ## Δh modules
#
# **Asyrp's DeltaBlock**, as its official code has it: a 1×1 convolution, plus a linear map of SiLU(time embedding),
# then GroupNorm, SiLU and another 1×1 convolution; default initialisation, no residual inside (its output *is* Δh).
# One per edit. The time embedding is the UNet's own (`unet.time_embedding(unet.time_proj(t))`, 256-d here), as Asyrp
# reuses its DDPM's.

# %%
#| export
def unet_temb(unet:nn.Module, # a diffusers UNet
              t:torch.Tensor # timesteps (B,)
             )->torch.Tensor:
    "The UNet's own time embedding of t (frozen modules), for Δh modules."
    return unet.time_embedding(unet.time_proj(t).to(next(unet.parameters()).dtype))


# %%
#| export
class DeltaBlock(nn.Module):
    "Asyrp's Δh network: conv1x1 + Linear(SiLU(temb)), GroupNorm, SiLU, conv1x1 (one per edit)."
    def __init__(self, channels:int=128, # h's channels
                 temb_dim:int=256 # the UNet's time-embedding width
                ):
        super().__init__()
        self.conv1, self.temb_proj = nn.Conv2d(channels, channels, 1), nn.Linear(temb_dim, channels)
        self.norm, self.conv2 = nn.GroupNorm(32, channels, eps=1e-6), nn.Conv2d(channels, channels, 1)
    def forward(self, h:torch.Tensor, temb:torch.Tensor, cond=None)->torch.Tensor:
        x = self.conv1(h) + self.temb_proj(F.silu(temb))[:, :, None, None]
        return self.conv2(F.silu(self.norm(x)))


# %%
#| export
class DeltaBlocks(nn.Module):
    "One DeltaBlock per edit, applied to each sample by its edit index (Asyrp trains one network per edit)."
    def __init__(self, n_edits:int, # number of edits
                 channels:int=128, # h's channels
                 temb_dim:int=256 # time-embedding width
                ):
        super().__init__(); self.blocks = nn.ModuleList(DeltaBlock(channels, temb_dim) for _ in range(n_edits))
    def forward(self, h:torch.Tensor, temb:torch.Tensor, edit:torch.Tensor)->torch.Tensor:
        out = torch.zeros_like(h)
        for e in edit.unique().tolist():
            m = edit == e; out[m] = self.blocks[e](h[m], temb[m])
        return out


# %% [markdown]
# **SCT, the semantic residual module (ours).** One network predicts Δh for every attribute and direction from h, t and
# the target semantics. The semantics are DermCLIP's template-averaged embedding of the target text joined with the
# edit's unit text direction (which is what makes "add streaks" and "remove streaks" different conditions). It has the
# DeltaBlock's interface, and more capacity: a 1×1 convolution in, two residual blocks whose GroupNorm is modulated by
# FiLM from SiLU(time embedding + condition embedding), and a *zero-initialised* 1×1 convolution out, so Δh = 0 at step
# 0 and training starts from the reconstruction (a stated difference from the DeltaBlock, whose random init edits at
# once).

# %%
#| export
class FiLMResBlock(nn.Module):
    "GN, SiLU, conv3x3, FiLM-modulated GN, SiLU, conv3x3, plus the input."
    def __init__(self, width:int, cond_dim:int):
        super().__init__()
        self.n1, self.c1 = nn.GroupNorm(32, width), nn.Conv2d(width, width, 3, padding=1)
        self.n2, self.c2 = nn.GroupNorm(32, width), nn.Conv2d(width, width, 3, padding=1)
        self.film = nn.Linear(cond_dim, 2 * width)
    def forward(self, x, g):
        y = self.c1(F.silu(self.n1(x))); gam, bet = self.film(g)[:, :, None, None].chunk(2, 1)
        return x + self.c2(F.silu(self.n2(y) * (1 + gam) + bet))


# %%
#| export
class SCT(nn.Module):
    "One Δh network for all edits: h, t and the target semantics (target embedding + edit direction) -> Δh."
    def __init__(self, channels:int=128, # h's channels
                 temb_dim:int=256, # the UNet's time-embedding width
                 sem_dim:int=512, # semantics: [target embedding ; edit direction]
                 width:int=128, # internal width
                 blocks:int=2 # residual FiLM blocks
                ):
        super().__init__()
        self.conv_in = nn.Conv2d(channels, width, 1)
        self.sem = nn.Sequential(nn.Linear(sem_dim, 256), nn.SiLU(), nn.Linear(256, 256)); self.temb = nn.Linear(temb_dim, 256)
        self.res = nn.ModuleList(FiLMResBlock(width, 256) for _ in range(blocks))
        self.out = nn.Sequential(nn.GroupNorm(32, width), nn.SiLU(), nn.Conv2d(width, channels, 1))
        nn.init.zeros_(self.out[-1].weight); nn.init.zeros_(self.out[-1].bias)
    def forward(self, h:torch.Tensor, temb:torch.Tensor, sem:torch.Tensor)->torch.Tensor:
        g = F.silu(self.temb(temb) + self.sem(sem)); x = self.conv_in(h)
        for r in self.res: x = r(x, g)
        return self.out(x)


# %%
h_, t_ = torch.randn(4, 128, 4, 4), torch.randn(4, 256)
test_eq(DeltaBlock()(h_, t_).shape, h_.shape)
db = DeltaBlocks(3); out_ = db(h_, t_, torch.tensor([0, 2, 2, 0]))
test_close(out_[1:3], db.blocks[2](h_[1:3], t_[1:3]), eps=1e-6)
sct = SCT(); test_eq(sct(h_, t_, torch.randn(4, 512)).abs().max().item(), 0.)       # zero-initialised output
print(f"DeltaBlock {sum(p.numel() for p in DeltaBlock().parameters()):,} parameters per edit; SCT {sum(p.numel() for p in sct.parameters()):,} for all edits")


# %% [markdown]
# ## The edit conditions
#
# Per edit: the unit text direction (`dermnb.clip.text_direction`, template-averaged, what the directional loss and
# S_dir compare with), the target embedding, and the text cosine between source and target (Asyrp weights its L1 term
# by it, and its t_edit rule uses it).

# %%
#| export
@torch.no_grad()
def edit_conditions(clip:ClipEncoder, # the CLIP of the losses (the concept-aware DermCLIP)
                    edits:Sequence[Edit] # the edits
                   )->dict:
    "Per edit (in order): 'direction' (E, D), 'semantics' (E, 2D) = [target embedding ; direction], 'cos' (E,)."
    from dermnb.clip import EDIT_TEMPLATES
    emb = lambda t: F.normalize(clip.encode_text([tp.format(t.replace('dermoscopy of ', '', 1)) for tp in EDIT_TEMPLATES]).mean(0), dim=-1)
    d, tg, cs = [], [], []
    for e in edits:
        s, t = e.texts; es_, et_ = emb(s), emb(t)
        d.append(F.normalize(et_ - es_, dim=-1)); tg.append(et_); cs.append(float(es_ @ et_))
    d = torch.stack(d).cpu(); tg = torch.stack(tg).cpu()
    return {'direction': d, 'semantics': torch.cat([tg, d], 1), 'cos': torch.tensor(cs)}


# %% [markdown]
# ## Training the h-space editors
#
# One loop trains the four h-space variants of the ablation; they differ in the Δh module and in the masks:
#
# | method | Δh module | L1 term | CLIP term | sampling |
# |---|---|---|---|---|
# | `asyrp` | a DeltaBlock per edit | whole image | whole image | asymmetric step |
# | `masking` (w/ Masking) | a DeltaBlock per edit | outside the lesion | inside the lesion | + background blending |
# | `sct` (w/ SCT) | one SCT | whole image | whole image | asymmetric step |
# | `cpde` | one SCT | outside the lesion | inside the lesion | + background blending |
#
# As in Asyrp's code, a batch of (image, edit) pairs is rolled out from its inverted x_T, and every timestep t ≥ t_edit
# is one optimizer step: the UNet runs plainly (no gradient) and with Δh (the gradient reaches Δh through one UNet call,
# from the mid-block up), x̂0 is decoded, and the loss is
# w_clip · (−log((2 − L_dir)/2)) + w_l1 · cos · L1(dec(x̂0_edit), dec(x̂0_rec)), the *dual branch*: the reconstruction
# branch's x̂0 at the same step (cached) is the reference of both terms. L_dir is the directional CLIP loss of the
# concept-aware DermCLIP against the edit's text direction; with masks, the edited image is composited onto the
# reconstruction outside the lesion before CLIP sees it, and L1 counts only outside the lesion (the mask-guided dual
# branch). The rollout continues with x̂0_edit (detached) and the original ε (η = 0); with blending, the background
# latents are put back from the inverted trajectory at every step, as at sampling. Pairs are source-state images:
# *add* edits images without the attribute, *remove* images with it (expert labels).

# %%
#| export
METHODS = ('asyrp', 'masking', 'sct', 'cpde')
EDIT_STEPS = 40      # DDIM steps of the h-space methods: Asyrp's official n_inv_step = n_train_step = n_test_step

@dataclass(frozen=True)
class EditorConfig(Config):
    "What a trained h-space editor depends on (hashed for the cache)."
    method:str='cpde'          # one of METHODS
    steps:int=EDIT_STEPS       # DDIM steps (the inversion's, training's and sampling's)
    t_edit:int=501             # Δh from this timestep up (chosen by `choose_t`)
    t_addnoise:int=201         # η = 1 below this timestep at sampling (`load_editor`: the rule's, or 0 without `quality_boost`)
    h_block:str='mid_block'    # where Δh is added: Asyrp's bottleneck (4×4 here) or 'up_blocks.0' (8×8, see below)
    pairs_per_edit:int=8       # training (image, edit) pairs per edit
    batch_size:int=8           # pairs per rollout
    epochs:int=1               # passes over the pairs
    lr:float=1e-2              # Adam (Asyrp's SGD at lr 0.5 for 12,500 steps does not fit the quick budget; 1e-3 barely moved)
    w_clip:float=1.            # Asyrp's clip_loss_w
    w_l1:float=3.              # Asyrp's l1_loss_w (times the text cosine)
    edits:tuple=tuple((e.attribute, e.direction) for e in ALL_EDITS)  # the edits it learns
    backbone:str=''            # the backbone's cache entry (part of the key)
    clip:str=''                # the loss CLIP's cache entry
    data:str=''                # the training images and masks
    seed:int=0
    clip_view:str='mask'       # masked methods: what CLIP sees of the lesion, 'mask' (composite) or 'crop' (`lesion_crop`)
    late_fields = ('clip_view',) # came after the figure's editors were cached: in the key only when set

    @property
    def masked(self)->bool: return self.method in ('masking', 'cpde')
    @property
    def uses_sct(self)->bool: return self.method in ('sct', 'cpde')


# %%
#| export
def source_pairs(es:EditSet, # images with concept labels
                 edits:Sequence[Edit], # the edits
                 per_edit:int, # pairs per edit
                 seed:int=0 # which images
                )->list:
    "(image index, edit index) pairs: per edit, images in its source state (without the attribute to add, with it to remove)."
    rng = np.random.default_rng(seed); out = []
    for j, e in enumerate(edits):
        lab = es.labels[e.concept]
        pool = np.flatnonzero((lab == (0 if e.direction == 'add' else 1)).to_numpy())
        if len(pool) == 0: continue
        out += [(int(i), j) for i in rng.choice(pool, per_edit, replace=len(pool) < per_edit)]
    return [out[k] for k in rng.permutation(len(out))]


# %% [markdown]
# The paper puts the CLIP term "on the lesion region" and leaves open whether CLIP sees the lesion masked or cropped.
# `clip_view='mask'` (the default) composites the edit onto the reconstruction outside the lesion, so CLIP sees the
# whole image with only the lesion changed; `clip_view='crop'` also cuts a square around the lesion and resizes it to
# the image size, so the lesion fills CLIP's view. `lesion_crop` does the cut with `roi_align`, which is differentiable,
# so the gradient reaches the edited pixels.

# %%
#| export
def lesion_crop(x:torch.Tensor, # images (B, C, S, S)
                masks:torch.Tensor, # lesion masks (B, 1, S, S) in [0, 1]
                margin:int=4, # pixels kept around the lesion's bounding box
                min_half:int=12 # half-side of the smallest crop, pixels
               )->torch.Tensor:
    "A square around each lesion (its bounding box, plus `margin`), resized to S × S; the whole image where the mask is empty."
    from torchvision.ops import roi_align
    B, S = x.shape[0], x.shape[-1]; boxes = []
    for m in masks[:, 0] > .5:
        ys, xs = torch.nonzero(m, as_tuple=True)
        if len(ys) == 0: boxes.append([0., 0., float(S), float(S)]); continue
        cy, cx = (ys.min().item() + ys.max().item() + 1) / 2, (xs.min().item() + xs.max().item() + 1) / 2
        h = max((ys.max() - ys.min()).item() + 1, (xs.max() - xs.min()).item() + 1) / 2 + margin
        h = max(h, min_half); boxes.append([cx - h, cy - h, cx + h, cy + h])
    rois = torch.cat([torch.arange(B, dtype=x.dtype)[:, None], torch.tensor(boxes, dtype=x.dtype)], 1).to(x.device)
    return roi_align(x, rois, (S, S), aligned=True)


# %%
m_ = torch.zeros(2, 1, 32, 32); m_[0, :, 8:16, 10:18] = 1                 # an 8-px lesion; the second mask is empty
x_ = torch.rand(2, 3, 32, 32, requires_grad=True)
c_ = lesion_crop(x_, m_)
test_eq(c_.shape, x_.shape)
test_close(c_[1], x_[1], eps=1e-5)                                          # empty mask: the whole image, unchanged
x2_ = torch.zeros(1, 3, 32, 32); x2_[..., 8:16, 10:18] = 1                  # the lesion fills the centre of its crop
assert lesion_crop(x2_, m_[:1])[..., 12:20, 12:20].min() > .99 and lesion_crop(x2_, m_[:1])[..., :2, :].max() < .01
c_.sum().backward(); assert x_.grad[0, :, 8:16, 10:18].abs().sum() > 0      # differentiable back to the lesion's pixels
test_eq(EditorConfig().hash(), EditorConfig(clip_view='mask').hash())       # the default keeps the existing cache keys
test_ne(EditorConfig().hash(), EditorConfig(clip_view='crop').hash())


# %%
#| export
def _decode_nc(bb:Backbone, z:torch.Tensor)->torch.Tensor:
    "Decode latents to pixels without the final clamp (which would cut gradients where the image saturates)."
    return bb.ae.decode_raw(z * bb.ae.scale.view(1, -1, 1, 1) + bb.ae.shift.view(1, -1, 1, 1)) if bb.ae is not None else z

def _edit_loss(clip, img_e, img_rec, dirs, cos, mask, cfg):
    "Asyrp's loss, masked for the mask-guided variants: w_clip·(−log((2 − L_dir)/2)) + w_l1·cos·L1."
    if cfg.masked and cfg.clip_view == 'crop':
        comp = img_rec * (1 - mask) + img_e * mask
        ldir = directional_clip_loss(clip, lesion_crop(img_rec, mask), lesion_crop(comp, mask), text_dir=dirs)
    else: ldir = directional_clip_loss(clip, img_rec, img_e, text_dir=dirs, mask=mask if cfg.masked else None)
    if cfg.masked:
        out = (1 - mask).expand_as(img_e); l1 = ((img_e - img_rec).abs() * out).sum() / out.sum().clamp_min(1.)
    else: l1 = (img_e - img_rec).abs().mean()
    return cfg.w_clip * -torch.log((2 - ldir) / 2) + cfg.w_l1 * cos.mean() * l1, ldir.detach(), l1.detach()


# %%
#| export
def h_channels(unet:nn.Module, # a diffusers UNet
               block:str='mid_block' # 'mid_block' or 'up_blocks.i'
              )->int:
    "Channels of the output of a UNet block (the width of h there)."
    bo = list(unet.config.block_out_channels)
    if block == 'mid_block': return bo[-1]
    if block.startswith('up_blocks.'): return bo[::-1][int(block.split('.')[1])]
    raise DermnbError(f"h_channels: block must be 'mid_block' or 'up_blocks.i', not {block!r}")


# %%
u2 = make_unet('text', sample_size=8, in_channels=4, cross_attention_dim=12, block_out_channels=(32, 64), head_dim=8)
test_eq([h_channels(u2, b) for b in ('mid_block', 'up_blocks.0', 'up_blocks.1')], [64, 64, 32])
with hspace_hook(u2, block='up_blocks.0') as hk2: u2(torch.randn(1, 4, 8, 8), 500, encoder_hidden_states=torch.zeros(1, 3, 12))
test_eq(hk2.hs[0].shape, (1, h_channels(u2, 'up_blocks.0'), 8, 8))                       # the h an 'up_blocks.0' editor sees
test_fail(lambda: h_channels(u2, 'down_blocks.0'), contains='up_blocks.i')
with torch.no_grad():                                                                     # the sampler passes the block on
    d_mid = asym_ddim(tb, xT, 10, delta=lambda h, t: torch.ones_like(h), t_edit=500)
    d_up = asym_ddim(tb, xT, 10, delta=lambda h, t: torch.ones_like(h), t_edit=500, h_block='up_blocks.0')
assert (d_up - d_mid).abs().max() > 1e-3


# %%
#| export
def make_editor(cfg:EditorConfig, # the editor's config
                temb_dim:int=256, # the UNet's time-embedding width
                channels:int=128, # h's channels
                sem_dim:int=512 # SCT's semantics width (2 x the CLIP embedding)
               )->nn.Module:
    "A fresh Δh module: an SCT, or one DeltaBlock per edit (seeded by the config)."
    torch.manual_seed(cfg.seed)
    return SCT(channels, temb_dim, sem_dim) if cfg.uses_sct else DeltaBlocks(len(cfg.edits), channels, temb_dim)

def _delta_fn(editor, unet, cfg, conds, edit_idx, strength=1.):
    "strength · Δh(h, t) for a batch whose samples have edits `edit_idx`."
    sem = conds['semantics'][edit_idx]
    return lambda h, t: strength * editor(h, unet_temb(unet, t), sem.to(h) if cfg.uses_sct else edit_idx.to(h.device))


# %%
#| export
def train_editor(bb:Backbone, # the (frozen) backbone
                 es:EditSet, # training images, masks and concept labels
                 inv:Inversion, # their cached inversions
                 clip:ClipEncoder, # the loss CLIP (frozen)
                 cfg:EditorConfig, # method, schedule, optimisation
                 progress:bool=True, # a progress bar
                 pairs:list|None=None # (image index, edit index) pairs; default `source_pairs` of `es`
                )->tuple:
    "Train a Δh module by rolling out batches of (image, edit) pairs; returns (editor, per-step history)."
    edits = [Edit(*e) for e in cfg.edits]; conds = edit_conditions(clip, edits)
    unet = bb.unet.eval().requires_grad_(False); clip.eval().requires_grad_(False)
    editor = make_editor(cfg, unet.time_embedding.linear_2.out_features, h_channels(unet, cfg.h_block),
                         conds['semantics'].shape[1]).to(bb.device)
    opt = torch.optim.Adam(editor.parameters(), cfg.lr)
    sch = DDIMScheduler.from_config(bb.scheduler.config); sch.set_timesteps(cfg.steps)
    pairs = pairs if pairs is not None else source_pairs(es, edits, cfg.pairs_per_edit, cfg.seed)
    lm = es.latent_masks(bb.ae.factor if bb.ae else 1)
    hist, null = [], None
    bar = tqdm(total=cfg.epochs * math.ceil(len(pairs) / cfg.batch_size), desc=f'train {cfg.method}', disable=not progress, leave=False)
    for ep in range(cfg.epochs):
        for b0 in range(0, len(pairs), cfg.batch_size):
            idx = torch.tensor([p[0] for p in pairs[b0:b0 + cfg.batch_size]]); ei = torch.tensor([p[1] for p in pairs[b0:b0 + cfg.batch_size]])
            B = len(idx); null = bb.null(B); x = inv.traj[0][idx].to(bb.device)
            M, m8, dirs, cos = es.masks[idx].to(bb.device), lm[idx].to(bb.device), conds['direction'][ei].to(bb.device), conds['cos'][ei].to(bb.device)
            delta = _delta_fn(editor, unet, cfg, conds, ei)
            for s, t in enumerate(inv.timesteps):
                if t < cfg.t_edit: break
                tp = t - sch.config.num_train_timesteps // cfg.steps
                abp = sch.alphas_cumprod[tp] if tp >= 0 else sch.final_alpha_cumprod
                with torch.no_grad(): v_o = unet(x, t, encoder_hidden_states=null).sample
                with hspace_hook(unet, delta=delta, record=False, block=cfg.h_block): v_e = unet(x, t, encoder_hidden_states=null).sample
                x0_e, _ = _x0_eps(v_e, x, t, sch); _, eps_o = _x0_eps(v_o, x, t, sch)
                with torch.no_grad(): img_rec = bb.decode(inv.rec_x0[s][idx].to(bb.device))
                loss, ldir, l1 = _edit_loss(clip, _decode_nc(bb, x0_e).clamp(-1.5, 1.5), img_rec, dirs, cos, M, cfg)
                if not torch.isfinite(loss): raise DermnbError(f"{cfg.method} editor: loss became {loss.item()} at t={t}; lower lr (now {cfg.lr})")
                opt.zero_grad(); loss.backward(); opt.step()
                hist.append({'epoch': ep, 'batch': b0 // cfg.batch_size, 't': t, 'loss': loss.item(), 'l_dir': ldir.item(), 'l1': l1.item()})
                with torch.no_grad():
                    x = abp.sqrt() * x0_e.detach() + (1 - abp).sqrt() * eps_o
                    if cfg.masked: x = m8 * x + (1 - m8) * inv.traj[s + 1][idx].to(x)
            bar.update()
    bar.close()
    return editor.eval(), pd.DataFrame(hist)


# %% [markdown]
# ## Editing with a trained Δh module
#
# `apply_editor` runs the asymmetric sampler from each image's inverted x_T with its edit's Δh; the mask-guided
# variants blend the inverted background latents back after every step (`x ← m·x + (1 − m)·traj[i+1]`, m the latent
# mask), so outside the lesion the sample follows the image's own trajectory. The latent trajectory still carries the
# autoencoder's and the inversion's error outside the lesion (measured: the NS-LPIPS of latent blending alone stayed
# near half of Asyrp's), so the mask-guided variants then composite the decoded edit onto the original pixels through
# the lesion mask, dilated by 2 px and feathered (`composite=True`, stated in the tables; the figure also reports CPDE
# with latent blending only).

# %%
#| export
@torch.no_grad()
def apply_editor(bb:Backbone, # the backbone
                 editor:nn.Module, # a trained Δh module
                 cfg:EditorConfig, # its config
                 es:EditSet, # images to edit
                 inv:Inversion, # their inversions
                 edit_idx:torch.Tensor, # (N,) the edit of each image (indices into cfg.edits)
                 conds:dict, # `edit_conditions` of cfg.edits
                 batch_size:int=32, # images per pass
                 seed:int=0, # for the η = 1 noise
                 composite:bool=True, # mask-guided methods: paste the edit onto the original pixels (feathered mask)
                 strength:float=1. # Δh is multiplied by this at sampling (Asyrp's `hs_coeff_delta_h`)
                )->torch.Tensor:
    "Edited images (N, 3, S, S) in [-1, 1]."
    out, lm, g = [], es.latent_masks(bb.ae.factor if bb.ae else 1), torch.Generator().manual_seed(seed)
    for i in range(0, len(es), batch_size):
        sl = slice(i, i + batch_size); ei = edit_idx[sl]; m8 = lm[sl].to(bb.device); traj = inv.traj[:, sl]
        blend = (lambda k, x: m8 * x + (1 - m8) * traj[k + 1].to(x)) if cfg.masked else None
        x0 = asym_ddim(bb, traj[0], cfg.steps, _delta_fn(editor, bb.unet, cfg, conds, ei, strength), cfg.t_edit, cfg.t_addnoise, blend, g,
                       h_block=cfg.h_block)
        y = bb.decode(x0).cpu()
        if cfg.masked and composite: y = composite_edit(es.images[sl], y, es.masks[sl])
        out.append(y)
    return torch.cat(out)


# %%
#| export
def composite_edit(orig:torch.Tensor, # originals (B, 3, S, S)
                   edited:torch.Tensor, # edits, same shape
                   masks:torch.Tensor, # lesion masks (B, 1, S, S)
                   dilate:int=2, # pixels added around the lesion
                   feather:float=1. # Gaussian softening of the edge, pixels
                  )->torch.Tensor:
    "The edit inside the (dilated, feathered) lesion mask, the original pixels outside it."
    from torchvision.transforms.v2.functional import gaussian_blur
    m = F.max_pool2d(masks.float(), 2 * dilate + 1, 1, dilate) if dilate else masks.float()
    if feather: m = gaussian_blur(m, [2 * math.ceil(3 * feather) + 1] * 2, [feather] * 2)
    return m * edited + (1 - m) * orig


# %% [markdown]
# **Throughput.** `apply_editor` edits a batch at once, and the plain and the edited UNet call of a step go into one
# batch of 2B. The naive Asyrp loop edits one image at a time with two calls per step. `benchmarks/cpde_throughput.py`
# times both at the editors' step count (same Δh module, base-model architecture, 64 px); the issue asks for 2×.
# The cell reads the ratio from the benchmark's CSV:

# %%
from dermnb.core import results_csv
tp_ = results_csv('benchmarks/results/cpde_throughput.csv').set_index('measure').value
assert tp_['steps'] == EDIT_STEPS and tp_['ratio'] >= 2
print(f"batched {tp_.iloc[0]:.1f} images/s vs naive {tp_.iloc[1]:.1f}: {tp_['ratio']:.2f}x at {int(tp_['steps'])} steps, {int(tp_['images'])} images")

# %% [markdown]
# ## The DiffusionCLIP-style baseline
#
# DiffusionCLIP fine-tunes the denoiser itself with the directional CLIP loss: from the image's inversion at t0 = 500,
# it samples back to x0 *keeping the graph through every step*, and minimises 3 · (−log((2 − L_dir)/2)) + L1(x, x̂0)
# against the real image (its official weights). Ours fine-tunes a LoRA of a copy of the UNet (rank `DCLIP_RANK` on the
# attention projections; the shared UNet and its cached inversions stay untouched), one copy per edit as the official
# code resets per edit, for the steps of a 20-step grid from t ≤ 500 (`DCLIP_STEPS`: 10 steps, against its official
# n_train_step 6; the graph is kept through all of them, so the h-space methods' 40 would double its memory and time), with Adam (its lr
# 8e-6 is for full weights; a LoRA's up-projection starts at zero and needs more). The official script takes one
# optimizer step per image over 50 images for several epochs; ours gets the optimizer budget of the h-space editors:
# they took 130 steps over 10 edits on the 20-step schedule, so each edit's LoRA takes 6 epochs x 2 batches = 12 steps (an earlier version took
# one pass, 2 steps per edit, which left the baseline nearly the identity; stated in the figure). On the 40-step
# schedule the h-space editors take 260 steps; the baseline was not retrained to match (stated here and in the figure).

# %%
#| export
DCLIP_RANK, DCLIP_T0, DCLIP_STEPS = 4, 500, 20

def train_diffusionclip(bb:Backbone, # the (frozen) backbone
                        es:EditSet, # training images
                        inv:Inversion, # their inversions
                        clip:ClipEncoder, # the loss CLIP
                        edit:Edit, # the one edit this model learns
                        per_edit:int=16, # source-state training images
                        batch_size:int=8, # images per step
                        lr:float=5e-4, # Adam on the LoRA
                        epochs:int=6, # passes over the images (6 x 2 = 12 steps per edit: the h-space editors' 130 steps over 10 edits)
                        seed:int=0 # which images, init
                       )->tuple:
    "A LoRA-tuned copy of the UNet for one edit (DiffusionCLIP's objective); returns (unet, start index, history)."
    conds = edit_conditions(clip, [edit]); clip.eval().requires_grad_(False)
    k0 = next(i for i, t in enumerate(inv.timesteps) if t <= DCLIP_T0)
    torch.manual_seed(seed); unet = copy.deepcopy(bb.unet); params = add_lora(unet, DCLIP_RANK); opt = torch.optim.Adam(params, lr)
    idx_all = torch.tensor([p[0] for p in source_pairs(es, [edit], per_edit, seed)]); hist = []
    g = torch.Generator().manual_seed(seed)
    for b in (b for _ in range(epochs) for b in idx_all[torch.randperm(len(idx_all), generator=g)].split(batch_size)):
        x0 = asym_ddim(bb, inv.traj[k0][b], inv.steps, unet=unet, start=k0, grad=True)
        real = es.images[b].to(bb.device); img = _decode_nc(bb, x0).clamp(-1.5, 1.5)
        ldir = directional_clip_loss(clip, real, img, text_dir=conds['direction'][0].to(bb.device))
        loss = 3 * -torch.log((2 - ldir) / 2) + (img - real).abs().mean()
        opt.zero_grad(); loss.backward(); opt.step(); hist.append({'loss': loss.item(), 'l_dir': ldir.item()})
    return unet.eval(), k0, pd.DataFrame(hist)

@torch.no_grad()
def apply_diffusionclip(bb:Backbone, # the backbone
                        unet:nn.Module, # a tuned copy from `train_diffusionclip`
                        k0:int, # its start index on the grid
                        inv:Inversion, # inversions of the images to edit
                        batch_size:int=32 # images per pass
                       )->torch.Tensor:
    "Images (N, 3, S, S) edited by a DiffusionCLIP-style model: deterministic DDIM from the inversion at t0."
    return torch.cat([bb.decode(asym_ddim(bb, inv.traj[k0][i:i + batch_size], inv.steps, unet=unet, start=k0)).cpu()
                      for i in range(0, inv.traj.shape[1], batch_size)])


# %% [markdown]
# The training and editing paths on a tiny random latent backbone and a tiny random CLIP (seconds): every method trains
# and edits; a zero-initialised SCT edits nothing before training; mask-guided editing leaves the latent background of
# the image's trajectory in place; DiffusionCLIP's LoRA leaves the shared UNet untouched.

# %%
from dermnb.clip import load_open_clip
import open_clip
with tempfile.TemporaryDirectory() as d:
    TINY = {'embed_dim': 32, 'vision_cfg': {'image_size': 32, 'layers': 1, 'width': 32, 'patch_size': 8, 'head_width': 16},
            'text_cfg': {'context_length': 32, 'vocab_size': 49408, 'width': 32, 'heads': 2, 'layers': 1}}
    (Path(d)/'cpde-tiny-clip.json').write_text(json.dumps(TINY)); open_clip.add_model_config(d)
    tclip = load_open_clip('cpde-tiny-clip', 'random')
from dermnb.diffusion import load_taef2
lb = Backbone(make_unet('text', sample_size=8, in_channels=32, cross_attention_dim=12, block_out_channels=(32, 128), head_dim=16),
              make_scheduler(prediction_type='v_prediction'), load_taef2(), lambda caps: torch.zeros(len(caps), 3, 12), image_size=64)
es6 = edit_set(get_split('ph2', 'train', ROOT)[:6]); inv6 = invert(lb, es6.images, steps=6)
small_edits = (('streaks', 'add'), ('streaks', 'remove')); trained_t = {}
for method in METHODS:
    cfg_e = EditorConfig(method=method, steps=6, t_edit=400, t_addnoise=100, pairs_per_edit=2, batch_size=4, edits=small_edits)
    ed_m, h_m = train_editor(lb, es6, inv6, tclip, cfg_e, progress=False)
    assert len(h_m) > 0 and np.isfinite(h_m.loss).all(), method
    conds_t = edit_conditions(tclip, [Edit(*e) for e in small_edits])
    out_m = apply_editor(lb, ed_m, cfg_e, es6.subset([0, 1]), inv6.subset([0, 1]), torch.tensor([0, 1]), conds_t)
    test_eq(out_m.shape, (2, 3, 64, 64)); trained_t[method] = (ed_m, cfg_e)
cfg0 = EditorConfig(method='sct', steps=6, t_edit=400, t_addnoise=0, edits=small_edits)
untrained = make_editor(cfg0, lb.unet.time_embedding.linear_2.out_features, 128, conds_t['semantics'].shape[1])
with torch.no_grad():
    same = apply_editor(lb, untrained, cfg0, es6.subset([0]), inv6.subset([0]), torch.tensor([0]), conds_t)
    rec = lb.decode(asym_ddim(lb, inv6.traj[0][:1], 6))
test_close(same, rec, eps=1e-4)                                                  # Δh = 0: the reconstruction
ed_s, cfg_s = trained_t['sct']; cfg_s = dataclasses.replace(cfg_s, t_addnoise=0)     # deterministic sampling
with torch.no_grad():
    by_k = {k: apply_editor(lb, ed_s, cfg_s, es6.subset([0]), inv6.subset([0]), torch.tensor([0]), conds_t, strength=k) for k in (0., 1., 3.)}
test_close(by_k[0.], rec, eps=1e-4)                                              # strength 0: no edit
test_close(by_k[1.], apply_editor(lb, ed_s, cfg_s, es6.subset([0]), inv6.subset([0]), torch.tensor([0]), conds_t), eps=1e-6)
assert (by_k[3.] - rec).abs().mean() > (by_k[1.] - rec).abs().mean() > 0        # a stronger Δh moves the image further
w0 = copy.deepcopy(lb.unet.state_dict())
dunet, k0_, dh = train_diffusionclip(lb, es6, inv6, tclip, Edit('streaks', 'add'), per_edit=2, batch_size=2, epochs=2)
test_eq(len(dh), 2)                                                               # one step per batch per epoch
test_eq(apply_diffusionclip(lb, dunet, k0_, inv6.subset([0])).shape, (1, 3, 64, 64))
ce = composite_edit(es6.images[:2], torch.zeros(2, 3, 64, 64), es6.masks[:2])
far = F.max_pool2d(es6.masks[:2], 11, 1, 5) == 0                                  # well outside the lesion: the original
test_close(ce[far.expand_as(ce)], es6.images[:2][far.expand_as(ce)], eps=1e-6)
assert all(torch.equal(v, lb.unet.state_dict()[k]) for k, v in w0.items())       # the shared UNet is untouched

# %% [markdown]
# ## Evaluation
#
# On held-out images (the test splits), per edited image:
#
# - **S_dir**: InstructPix2Pix's directional similarity with the concept-aware DermCLIP (and any other CLIP given);
# - **NS-LPIPS**: the project's LPIPS-style distance (`effnet_lpips_uncalibrated`: ImageNet EfficientNet-Lite0 features,
#   unit weights, not calibrated to human judgements) outside the lesion;
# - **segmentation consistency**: Dice of the U-Net's mask of the edited image against the original mask;
# - **diagnostic consistency**: whether a diagnosis classifier keeps its prediction;
# - **edit confirmation**: whether the concept classifier detects the target attribute after the edit, and before.
#
# FID compares the edited set with the unedited originals on the standard Inception (n in the table); the paper's FID
# scale (below 1) is not the Inception one, so orderings and ratios are what compare.

# %%
#| export
PAPER = pd.DataFrame({'method': ['Asyrp', 'DiffusionCLIP', 'w/ Masking', 'w/ SCT', 'CPDE'], 'fid': [.482, 1.761, .372, .391, .274],
                      's_dir': [.452, .413, .461, .477, .486], 'ns_lpips': [.151, .247, .022, .163, .012]})
METHOD_NAMES = {'asyrp': 'Asyrp', 'diffusionclip': 'DiffusionCLIP', 'masking': 'w/ Masking', 'sct': 'w/ SCT', 'cpde': 'CPDE'}


# %%
#| export
def diagnosis_head(root:str|Path|None=None, # data root
                   seed:int=0 # solver seed
                  ):
    "A melanoma / nevus / other classifier on frozen Lite0 features of the Derm7pt + PH2 training images (diagnostic consistency)."
    from dermnb.lesiongen import record_features, fit_linear_head
    recs = [r for ds in ('derm7pt', 'ph2') for r in get_split(ds, 'train', root) if r.diagnosis]
    y = np.array([{'melanoma': 0, 'nevus': 1}.get(r.diagnosis, 2) for r in recs])
    return fit_linear_head(record_features(recs).numpy(), y, seed)


# %%
#| export
@torch.no_grad()
def edit_metrics(orig:torch.Tensor, # originals (N, 3, S, S) in [-1, 1]
                 edited:torch.Tensor, # edited images, same shape
                 masks:torch.Tensor, # lesion masks (N, 1, S, S)
                 edits:Sequence[Edit], # the edit of each image
                 clip:ClipEncoder, # the S_dir CLIP
                 judge, # the concept classifier (`dermnb.lesiongen.load_concept_classifier`)
                 dx_head, # `diagnosis_head`
                 unet_seg, # the U-Net (`dermnb.segmenter.load_segmenter`)
                 device:str='auto' # LPIPS device
                )->pd.DataFrame:
    "Per edited image (`item` = its position): S_dir, NS-LPIPS, U-Net Dice vs the original mask, diagnosis kept, target detected before / after."
    from dermnb.lesiongen import lite0_features
    from dermnb.segmenter import predict_proba
    src = [e.texts[0] for e in edits]; trg = [e.texts[1] for e in edits]
    sdir = clip_direction_similarity(clip, orig, edited, src, trg).cpu().numpy()
    nsl = ns_lpips((orig + 1) / 2, ((edited + 1) / 2).clamp(0, 1), masks[:, 0], device=device).numpy()
    segd = [seg_metrics(p > .5, m[0].numpy() > .5)['dice'] for p, m in zip(predict_proba(unet_seg, [tensor_to_image(x) for x in edited]), masks)]
    fo, fe = lite0_features(orig).numpy(), lite0_features(edited).numpy()
    dx_kept = dx_head.predict(fo) == dx_head.predict(fe)
    po, pe = judge.predict_features(fo), judge.predict_features(fe)
    det = lambda P, e: bool(P[e.concept] >= judge.thresholds[e.concept]['decision'])
    return pd.DataFrame([{'item': i, 'edit': e.name, 'attribute': e.attribute, 'direction': e.direction, 's_dir': float(sdir[i]),
                          'ns_lpips': float(nsl[i]), 'seg_dice': float(segd[i]), 'dx_kept': bool(dx_kept[i]),
                          'detected_before': det(po.iloc[i], e), 'detected_after': det(pe.iloc[i], e)} for i, e in enumerate(edits)])


# %%
#| export
def comparison(per_image:pd.DataFrame, # `edit_metrics` rows with a 'method' column
               fids:dict, # method -> {'fid', 'kid', 'n', ...} of its edited set against the originals
               mask_source:str # where the masks came from (stated in the table)
              )->pd.DataFrame:
    "Per method: FID, S_dir, NS-LPIPS (the paper's table), with consistency, confirmation and n; paper numbers beside."
    g = per_image.groupby('method', sort=False)
    t = g[['s_dir', 'ns_lpips', 'seg_dice']].mean()
    t['dx_consistency'] = g.dx_kept.mean(); t['n'] = g.size()
    add = per_image[per_image.direction == 'add'].groupby('method', sort=False)
    rem = per_image[per_image.direction == 'remove'].groupby('method', sort=False)
    t['add_detected_before'], t['add_detected_after'] = add.detected_before.mean(), add.detected_after.mean()
    t['remove_detected_before'], t['remove_detected_after'] = rem.detected_before.mean(), rem.detected_after.mean()
    t['fid'] = pd.Series({m: fids[m]['fid'] for m in t.index}); t['kid'] = pd.Series({m: fids[m]['kid'] for m in t.index})
    t = t.reset_index(); t['method'] = t.method.map(lambda m: METHOD_NAMES.get(m, m)); t['masks'] = mask_source
    return t.merge(PAPER.rename(columns={'fid': 'paper_fid', 's_dir': 'paper_s_dir', 'ns_lpips': 'paper_ns_lpips'}), on='method', how='left')


# %%
pi_ = pd.DataFrame({'method': ['asyrp', 'asyrp', 'cpde'], 'edit': ['add streaks'] * 3, 'direction': ['add', 'remove', 'add'],
                    's_dir': [.1, .3, .5], 'ns_lpips': [.2, .2, .0], 'seg_dice': [.9, .8, 1.], 'dx_kept': [True, False, True],
                    'detected_before': [False, True, False], 'detected_after': [True, True, True]})
ct = comparison(pi_, {'asyrp': {'fid': 10., 'kid': .1}, 'cpde': {'fid': 5., 'kid': .05}}, 'ground truth').set_index('method')
test_close(ct.loc['Asyrp', 's_dir'], .2); test_eq(ct.loc['CPDE', 'paper_fid'], .274); test_eq(int(ct.loc['Asyrp', 'n']), 2)


# %% [markdown]
# **Orderings with their noise.** Every method edits the same images, so an ordering is read from the per-image
# *paired* difference, whose standard error is much smaller than either mean's (S_dir per image has a spread of about
# 0.15, so a mean over 80 edits is only known to about ±0.017). `paired_difference` gives the mean difference, its
# standard error and z = mean / SE; the figure calls an ordering *significant* at |z| ≥ 2.

# %%
#| export
def paired_difference(per_image:pd.DataFrame, # `edit_metrics` rows with 'method' and 'item' columns
                      metric:str, # a per-image column, e.g. 's_dir'
                      a:str, # method a
                      b:str # method b (the difference is a − b)
                     )->dict:
    "Mean, standard error and z of metric(a) − metric(b) over the items both methods edited."
    w = per_image.pivot_table(index='item', columns='method', values=metric)
    if a not in w or b not in w: raise DermnbError(f"paired_difference: no rows for {[m for m in (a, b) if m not in w]}; methods: {list(w.columns)}")
    d = (w[a] - w[b]).dropna().astype(float); n = len(d)
    se = float(d.std(ddof=1) / np.sqrt(n)) if n > 1 else float('nan')
    return {'diff': float(d.mean()), 'se': se, 'z': float(d.mean() / se) if se and se > 0 else float('nan'), 'n': n}


# %%
pd_ = pd.DataFrame({'method': ['a'] * 4 + ['b'] * 4, 'item': list(range(4)) * 2, 's_dir': [.3, .5, .2, .4, .1, .4, .1, .2]})
r_ = paired_difference(pd_, 's_dir', 'a', 'b')
test_close(r_['diff'], np.mean([.2, .1, .1, .2])); test_close(r_['se'], np.std([.2, .1, .1, .2], ddof=1) / 2); test_eq(r_['n'], 4)
test_close(paired_difference(pd_, 's_dir', 'b', 'a')['diff'], -r_['diff'])
test_fail(lambda: paired_difference(pd_, 's_dir', 'a', 'c'), contains='no rows')


# %% [markdown]
# **Counterfactual augmentation for long-tailed attributes.** A detector of a rare attribute (a balanced logistic
# head on frozen Lite0 features, as the concept classifier) is trained on the real training images, and again with
# CPDE counterfactuals added: images without the attribute edited to have it (labelled positive) and images with it
# edited to lose it (labelled negative). Recall on the held-out images that have the attribute, over seeds.

# %%
#| export
def counterfactual_augmentation(real_X:np.ndarray, # Lite0 features of the real training images
                                real_y:np.ndarray, # the attribute's labels (0/1)
                                cf_X:np.ndarray, # features of counterfactuals
                                cf_y:np.ndarray, # their labels (1 for added, 0 for removed)
                                test_X:np.ndarray, # test features
                                test_y:np.ndarray, # test labels
                                seed:int=0 # solver seed
                               )->dict:
    "Recall and balanced accuracy of an attribute detector trained without and with counterfactuals."
    from dermnb.lesiongen import fit_linear_head
    out = {}
    for arm, (X, y) in (('real only', (real_X, real_y)), ('real + counterfactuals', (np.concatenate([real_X, cf_X]), np.concatenate([real_y, cf_y])))):
        p = fit_linear_head(X, y, seed, C=0.01).predict(test_X)
        out[arm] = {'recall': float((p[test_y == 1] == 1).mean()), 'balanced_accuracy': float(((p[test_y == 1] == 1).mean() + (p[test_y == 0] == 0).mean()) / 2)}
    return out


# %%
g_ = np.random.default_rng(0); Xr_ = g_.normal(size=(100, 4)); yr_ = (np.arange(100) < 10).astype(int); Xr_[yr_ == 1, 0] += 2
ca_ = counterfactual_augmentation(Xr_, yr_, Xr_[:10] + .1, np.ones(10, int), Xr_, yr_)
assert set(ca_) == {'real only', 'real + counterfactuals'} and 0 <= ca_['real only']['recall'] <= 1

# %% [markdown]
# ## Trained editors, cached
#
# `cpde_images` is the editing data: PH2 (ground-truth masks) and Derm7pt (masks from `mask_method`), with their expert
# concept labels. `load_editor` trains (on a cache miss) one h-space method on the training split's source-state pairs,
# with t_edit and t_addnoise from the LPIPS rule (one value for all edits, at the edits' mean text cosine, so that one
# SCT serves all), and returns it with its config and conditions; `load_diffusionclip` does the same per edit.
#
# What every loader recomputed on a warm cache is kept too. The cpde figure asks for the training set fifteen times
# (four editors, ten DiffusionCLIP LoRAs, itself), and each time the U-Net segmented Derm7pt again. Each editor also
# redrew the LPIPS curves. So `cpde_images` is memoized per process (treat its result as read-only). The curves are
# cached on disk by backbone, images and steps, and `load_diffusionclip` reads the training set only on a cache miss.
# On a warm cache, a `load_editor` after the first in a process segments and redraws nothing.

# %%
#| export
EDIT_DATASETS = ('ph2', 'derm7pt')

def cpde_images(split:str='train', # 'train' or 'test'
                mask_method:str='unet', # segmenter for images without a ground-truth mask (Derm7pt)
                profile:str='quick', # segmenter profile
                root:str|Path|None=None, # data root
                device:str='auto' # device
               )->EditSet:
    "The editing images of a split (PH2 + Derm7pt) with masks and expert concept labels (memoized per process: read-only)."
    return _cpde_images(split, mask_method, profile, str(data_root(root)), device)

@functools.lru_cache(maxsize=4)
def _cpde_images(split, mask_method, profile, root, device):
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        recs = [r for ds in EDIT_DATASETS for r in get_split(ds, split, root)]
    return edit_set(recs, get_profile(profile).image_size, mask_method, profile, root, device)


# %%
#| export
def _pairs_subset(es:EditSet, cfg:EditorConfig)->tuple:
    "The training pairs of a config, and the sub-EditSet of the images they use (pair indices remapped)."
    pairs = source_pairs(es, [Edit(*e) for e in cfg.edits], cfg.pairs_per_edit, cfg.seed)
    used = sorted({i for i, _ in pairs}); pos = {i: k for k, i in enumerate(used)}
    return es.subset(used), [(pos[i], e) for i, e in pairs]

def edit_schedule(bb:Backbone, # the backbone
                  es:EditSet, # training images
                  clip:ClipEncoder, # the loss CLIP (text cosines)
                  steps:int=20, # DDIM steps
                  n:int=24 # images for the LPIPS curves
                 )->dict:
    "t_edit / t_addnoise by Asyrp's rule on this backbone, at the edits' mean text cosine; with the curves (cached)."
    sub = es.subset(range(min(n, len(es))))
    curves_of = lambda: lpips_curves(bb, sub, cached_inversion(bb, sub, steps))
    if getattr(bb, 'cache_dir', None) is None: curves = curves_of()          # an unnamed backbone: nothing to key a cache on
    else:
        key = {'backbone': str(bb.cache_dir), 'ids': sub.ids, 'steps': steps, 'pixels': tensor_hash(sub.images)}
        curves = pd.read_csv(cached_dir('cpde-lpips-curves', key, lambda d: curves_of().to_csv(d/'curves.csv', index=False))/'curves.csv',
                             float_precision='round_trip')                 # the exact floats back
    cos = float(edit_conditions(clip, list(ALL_EDITS))['cos'].mean())
    return {**choose_t(curves, cos), 'cos': cos, 'curves': curves}


# %%
with tempfile.TemporaryDirectory() as d:                       # the curves are cached by backbone, images and steps
    os.environ['DERMNB_CACHE'] = d; lb.cache_dir = Path('toy-backbone')
    s1 = edit_schedule(lb, es6, tclip, steps=6, n=4); s2 = edit_schedule(lb, es6, tclip, steps=6, n=4)
    test_eq(len(list((Path(d)/'cpde-lpips-curves').iterdir())), 1)
    del lb.cache_dir; s3 = edit_schedule(lb, es6, tclip, steps=6, n=4)    # no name: computed, not cached
    del os.environ['DERMNB_CACHE']
test_eq((s1['t_edit'], s1['t_addnoise']), (s2['t_edit'], s2['t_addnoise'])); test_eq((s3['t_edit'], s3['t_addnoise']), (s1['t_edit'], s1['t_addnoise']))
test_eq(s2['curves'][['d_x0', 'd_xt']].to_numpy(), s3['curves'][['d_x0', 'd_xt']].to_numpy())   # the CSV round trip keeps every bit
test_eq(len(s1['curves']), 6)

# %% [markdown]
# **What Asyrp's quality boosting costs here.** Below t_addnoise Asyrp samples with η = 1, which on its 256-px pixel
# DDPM adds detail. On our 64-px latent model the fresh noise in the last steps redraws what the inversion would have
# kept. On the training split (`benchmarks/cpde_quality_boost.py`: the same editors and images, sampling only; measured
# on the 20-step schedule of the time),
# deterministic sampling (η = 0 throughout) raises segmentation consistency and lowers NS-LPIPS for CPDE and for
# Asyrp, with the edit and without it (Δh = 0); it raises CPDE's S_dir and lowers Asyrp's a little; and it lowers the
# concept classifier's detection after an 'add' edit for both (the redrawn detail is partly what the classifier reads
# as the attribute). The figure keeps the official schedule (`QUALITY_BOOST = True`) for every method: the Asyrp
# baseline is specified as the official code runs it, and one sampler for all methods keeps the ablation a
# one-factor comparison. `load_editor(quality_boost=False)` gives the deterministic sampler for every method; the
# issue notes give the whole figure measured that way. The table is the benchmark's result, and the cell checks the
# claims just made against it.

# %%
#| export
QUALITY_BOOST = True     # sample with η = 1 below the rule's t_addnoise (Asyrp's quality boosting, as the official code does)

# %%
from dermnb.core import results_csv
qb = results_csv('benchmarks/results/cpde_quality_boost.csv')
q_ = qb.set_index(['method', 'strength', 'quality_boost'])
for m_ in qb.method.unique():
    for st_ in qb.strength.unique():
        on_, off_ = q_.loc[(m_, st_, True)], q_.loc[(m_, st_, False)]
        assert off_.seg_dice > on_.seg_dice and off_.ns_lpips < on_.ns_lpips, (m_, st_)
    assert q_.loc[(m_, 1., False)].add_detected_after < q_.loc[(m_, 1., True)].add_detected_after, m_
assert q_.loc[('cpde', 1., False)].s_dir > q_.loc[('cpde', 1., True)].s_dir and q_.loc[('asyrp', 1., False)].s_dir < q_.loc[('asyrp', 1., True)].s_dir
qb.round(3)

# %% [markdown]
# **How many DDIM steps (`EDIT_STEPS`).** Asyrp's official scripts invert, train and sample with 40 steps; an earlier
# version here used the base model's 20-step sampling grid. `benchmarks/cpde_steps.py` trains every h-space editor at
# 20 and at 40 steps (same config otherwise; 40 steps also means twice the optimizer steps, one per timestep above
# t_edit) and edits the same 160 *validation* pairs with the figure's sampler. At 40 steps the inversion reconstructs
# better: CPDE's pipeline with Δh = 0 keeps the lesion's shape better (segmentation consistency up), and so does CPDE
# with its edit on, at the same S_dir within its standard error. The editors without masks edit harder: Asyrp's
# NS-LPIPS grows and its segmentation consistency falls, at the same S_dir. On validation, none of the paper's S_dir
# and NS-LPIPS orderings changes between the two: CPDE and w/ SCT stay behind Asyrp on S_dir, CPDE stays ahead on
# NS-LPIPS, and w/ Masking stays under a fifth of Asyrp's NS-LPIPS. The editors use 40 steps, and training them
# takes twice as long. The
# DiffusionCLIP-style baseline keeps its 20-step grid (`DCLIP_STEPS`, below). The cell checks these statements
# against the benchmark's CSV.

# %%
stp = results_csv('benchmarks/results/cpde_steps.csv').set_index(['method', 'steps', 'strength'])
s20, s40 = (lambda m, k=1.: stp.loc[(m, 20, k)]), (lambda m, k=1.: stp.loc[(m, 40, k)])
assert (stp.xs(40, level='steps').optimizer_steps == 2 * stp.xs(20, level='steps').optimizer_steps).all()
assert s40('cpde', 0.).seg_dice > s20('cpde', 0.).seg_dice and s40('cpde').seg_dice > s20('cpde').seg_dice
assert abs(s40('cpde').s_dir - s20('cpde').s_dir) < s20('cpde').s_dir_se
assert s40('asyrp').ns_lpips > s20('asyrp').ns_lpips and s40('asyrp').seg_dice < s20('asyrp').seg_dice
assert abs(s40('asyrp').s_dir - s20('asyrp').s_dir) < s20('asyrp').s_dir_se
for g in (s20, s40):
    assert g('cpde').s_dir < g('asyrp').s_dir and g('sct').s_dir < g('asyrp').s_dir and g('masking').ns_lpips < g('asyrp').ns_lpips / 5
    assert g('cpde').ns_lpips < g('asyrp').ns_lpips
stp.reset_index()[['method', 'steps', 'strength', 'optimizer_steps', 'n', 's_dir', 's_dir_se', 'ns_lpips', 'seg_dice', 'dx_kept',
                   'add_detected_before', 'add_detected_after', 'remove_detected_after']].round(3)

# %% [markdown]
# **Where Δh goes (`h_block`).** Asyrp's h is the bottleneck, 8×8 at 256 px; our bottleneck is 4×4, and the skip
# connections around it carry most of what the decoder draws, which is one reason the editors here change little. The
# hook can instead add Δh to the output of the first up block (`h_block='up_blocks.0'`: 128×8×8, after the 4×4 skip
# connection has joined), the size of Asyrp's h. `benchmarks/cpde_h_block.py` trains each editor both ways (same
# config otherwise, on the 20-step schedule of the time) and edits the same 160 *validation* pairs. For Asyrp the 8×8 Δh moves the image much more
# (NS-LPIPS and segmentation consistency worsen, the diagnosis flips more) but not towards the text: S_dir falls, and
# the concept classifier stops finding the attribute at all after an 'add'. For CPDE, S_dir rises by less than its
# standard error and segmentation consistency stays within a point. So the editors keep Asyrp's definition, the
# mid-block; the cell checks these statements against the benchmark's CSV.

# %%
hbk = results_csv('benchmarks/results/cpde_h_block.csv').set_index(['method', 'h_block', 'quality_boost', 'strength'])
a_mid, a_up = hbk.loc[('asyrp', 'mid_block', True, 1.)], hbk.loc[('asyrp', 'up_blocks.0', True, 1.)]
assert a_up.ns_lpips > a_mid.ns_lpips and a_up.seg_dice < a_mid.seg_dice and a_up.dx_kept < a_mid.dx_kept
assert a_up.s_dir < a_mid.s_dir and a_up.add_detected_after < a_mid.add_detected_after
c_mid, c_up = hbk.loc[('cpde', 'mid_block', True, 1.)], hbk.loc[('cpde', 'up_blocks.0', True, 1.)]
assert 0 < c_up.s_dir - c_mid.s_dir < c_mid.s_dir_se and abs(c_up.seg_dice - c_mid.seg_dice) < .01
hbk.reset_index()[['method', 'h_block', 'quality_boost', 'strength', 'n', 's_dir', 's_dir_se', 'ns_lpips', 'seg_dice', 'dx_kept',
                   'add_detected_before', 'add_detected_after', 'remove_detected_after']].round(3)

# %% [markdown]
# **The loss weights, the CLIP view and the edit strength.** CPDE keeps Asyrp's weights (CLIP 1, L1 3), but in the
# mask-guided branch L1 counts only outside the lesion, where blending and the composite keep the context anyway, and
# the CLIP term sees only what changed inside the lesion. So the masked editor could be held back by a CLIP term too weak
# against L1, by CLIP seeing a small lesion inside a whole image, or by a Δh too small at sampling.
# `benchmarks/cpde_loss_weights.py` trains the CPDE editor with CLIP weight 3 or 10, with no L1 term, and with CLIP
# on a crop around the lesion (`clip_view='crop'`), same config otherwise, and edits the same 160 *validation* pairs at
# Δh strength 1 and 2 (Asyrp's `hs_coeff_delta_h`). It also runs Asyrp's and CPDE's pipelines with Δh = 0.
#
# What it shows:
# - The S_dir gap is in the edit itself, not in the reconstruction. Both pipelines' Δh = 0 floors are near zero and
#   close to each other. Asyrp's edit adds several times what CPDE's adds.
# - None of the variants reaches Asyrp's S_dir:
#   - A larger CLIP weight does not raise S_dir at strength 1, and at 10 it costs segmentation consistency.
#   - Dropping L1 lowers S_dir, so L1 outside the lesion is not what holds the edit back.
#   - The crop view lowers S_dir at strength 1, but it raises 'add' detection.
#   - Doubling Δh raises S_dir for every variant and lowers segmentation consistency. Where consistency stays at or
#     above 0.9, S_dir stays more than one standard error below Asyrp.
#
# None is adopted: each buys at most a fraction of the gap, and most of them lose the segmentation consistency that
# CPDE meets. The cell checks these statements against the benchmark's CSV.

# %%
lw = results_csv('benchmarks/results/cpde_loss_weights.csv').set_index(['method', 'w_clip', 'w_l1', 'clip_view', 'strength'])
a1, a0 = lw.loc[('asyrp', 1., 3., 'mask', 1.)], lw.loc[('asyrp', 1., 3., 'mask', 0.)]
c1, c0 = lw.loc[('cpde', 1., 3., 'mask', 1.)], lw.loc[('cpde', 1., 3., 'mask', 0.)]
assert abs(a0.s_dir - c0.s_dir) < c0.s_dir_se and a1.s_dir - a0.s_dir > 3 * (c1.s_dir - c0.s_dir) > 0   # the gap is the edit's
cv = lw.loc['cpde'].drop(index=0., level='strength')
assert (cv.s_dir < a1.s_dir).all()                                                                      # no variant reaches Asyrp
assert abs(lw.loc[('cpde', 3., 3., 'mask', 1.)].s_dir - c1.s_dir) < c1.s_dir_se and lw.loc[('cpde', 10., 3., 'mask', 1.)].seg_dice < .9
assert lw.loc[('cpde', 1., 0., 'mask', 1.)].s_dir < c1.s_dir
cr = lw.loc[('cpde', 1., 3., 'crop', 1.)]; assert cr.s_dir < c1.s_dir and cr.add_detected_after > c1.add_detected_after
k1, k2 = cv.xs(1., level='strength'), cv.xs(2., level='strength')
assert (k2.s_dir > k1.s_dir).all() and (k2.seg_dice < k1.seg_dice).all()
ok = cv[cv.seg_dice >= .9]; assert (ok.s_dir < a1.s_dir - ok.s_dir_se).all()
lw.reset_index()[['method', 'w_clip', 'w_l1', 'clip_view', 'strength', 'n', 's_dir', 's_dir_se', 'ns_lpips', 'seg_dice', 'dx_kept',
                  'add_detected_before', 'add_detected_after', 'remove_detected_after']].round(3)

# %% [markdown]
# **The training budget.** Training the four editors is the largest part of the cpde figure's time from an empty
# cache. Each editor takes one optimizer step per timestep above t_edit and per batch of 8 pairs, so halving the pairs
# per edit (8 → 4) halves its training time. `benchmarks/cpde_train_budget.py` trains every editor both ways and edits
# the same 160 *validation* pairs. Half the pairs halves each editor's time. CPDE's segmentation consistency holds, but
# the SCT editors learn a weaker direction: S_dir falls for w/ SCT and for CPDE (and for Asyrp), and CPDE's gap to
# Asyrp does not narrow.
# The time it would save would not bring the figure within 12 minutes either (its stage times from an empty editor
# cache are in `figures/cpde/timings_empty_cache.csv`). Not adopted; the cell checks these statements against the CSVs.

# %%
tb = results_csv('benchmarks/results/cpde_train_budget.csv').set_index(['method', 'pairs_per_edit'])
full_, half_ = tb.xs(8, level='pairs_per_edit'), tb.xs(4, level='pairs_per_edit')
assert (half_.optimizer_steps * 2 == full_.optimizer_steps).all() and (half_.train_s < .55 * full_.train_s).all()
assert (half_.seg_dice.loc[['cpde']] >= .9).all() and (full_.seg_dice.loc[['cpde']] >= .9).all()
assert (half_.s_dir.loc[['sct', 'cpde']] < full_.s_dir.loc[['sct', 'cpde']]).all()
assert (full_.s_dir.loc['asyrp'] - full_.s_dir.loc['cpde']) < (half_.s_dir.loc['asyrp'] - half_.s_dir.loc['cpde'])
fig_s = results_csv('figures/cpde/timings_empty_cache.csv').seconds.sum(); saved = (full_.train_s - half_.train_s).sum()
assert fig_s - saved > 12 * 60
print(f"figure {fig_s:.0f} s from an empty editor cache; half the pairs would save {saved:.0f} s -> {fig_s - saved:.0f} s (target 720 s)")
tb.reset_index()[['method', 'pairs_per_edit', 'optimizer_steps', 'train_s', 'n', 's_dir', 's_dir_se', 'ns_lpips', 'seg_dice', 'dx_kept',
                  'add_detected_before', 'add_detected_after', 'remove_detected_after']].round(3)


# %%
#| export
def load_editor(method:str='cpde', # one of METHODS
                profile:str='quick', # run profile
                root:str|Path|None=None, # data root
                device:str='auto', # device
                mask_method:str='unet', # masks of Derm7pt
                progress:bool=True, # progress bars
                quality_boost:bool=QUALITY_BOOST, # η = 1 below the rule's t_addnoise at sampling (else deterministic)
                **kw # EditorConfig overrides (pairs_per_edit, lr, ...)
               )->tuple:
    "(editor, config, conditions, backbone, clip): a trained h-space editor, trained and cached on a miss."
    from dermnb.base import load_base_model, base_config
    from dermnb.lesiongen import load_concept_dermclip
    if method not in METHODS: raise DermnbError(f"unknown method {method!r}; choose from {METHODS} (or 'diffusionclip')")
    bb = load_base_model(profile, root, device=device, progress=progress); bb.cache_dir = Path(base_config(profile).hash())
    clip = load_concept_dermclip(profile, root, 'cpu')
    es = cpde_images('train', mask_method, profile, root, device)
    sched = edit_schedule(bb, es, clip)
    cfg = EditorConfig(method=method, t_edit=sched['t_edit'], t_addnoise=sched['t_addnoise'] if quality_boost else 0, backbone=base_config(profile).hash(),
                       clip=clip.cache_dir.name, data=f"{'+'.join(EDIT_DATASETS)}:train:masks-{mask_method}", **kw)
    conds = edit_conditions(clip, [Edit(*e) for e in cfg.edits])
    def build(d):
        sub, pairs = _pairs_subset(es, cfg); inv = cached_inversion(bb, sub, cfg.steps)
        t0 = time.time(); ed, hist = train_editor(bb, sub, inv, clip, cfg, progress, pairs)
        torch.save(ed.state_dict(), d/'editor.pt'); hist.assign(seconds=time.time() - t0).to_csv(d/'history.csv', index=False)
    path = cached_dir('cpde-editor', cfg, build)
    ed = make_editor(cfg, bb.unet.time_embedding.linear_2.out_features, h_channels(bb.unet, cfg.h_block), conds['semantics'].shape[1])
    ed.load_state_dict(torch.load(path/'editor.pt')); ed.cache_dir = path
    return ed.to(bb.device).eval(), cfg, conds, bb, clip


# %%
#| export
def load_diffusionclip(edit:Edit, # the edit
                       profile:str='quick', # run profile
                       root:str|Path|None=None, # data root
                       device:str='auto', # device
                       mask_method:str='unet', # masks of Derm7pt (only to pick the same images)
                       per_edit:int=16, # training images
                       epochs:int=6, # passes over them
                       progress:bool=True # progress bars
                      )->tuple:
    "(unet, k0, backbone): the DiffusionCLIP-style LoRA model of one edit, trained and cached on a miss."
    from dermnb.base import load_base_model, base_config
    from dermnb.lesiongen import load_concept_dermclip
    from dermnb.diffusion import save_lora, load_lora
    bb = load_base_model(profile, root, device=device, progress=progress); bb.cache_dir = Path(base_config(profile).hash())
    clip = load_concept_dermclip(profile, root, 'cpu')
    key = {'edit': [edit.attribute, edit.direction], 'backbone': base_config(profile).hash(), 'clip': clip.cache_dir.name,
           'per_edit': per_edit, 'epochs': epochs, 'rank': DCLIP_RANK, 't0': DCLIP_T0, 'steps': DCLIP_STEPS, 'data': f'masks-{mask_method}', 'version': 2}
    def build(d):
        cfg = EditorConfig(edits=((edit.attribute, edit.direction),), pairs_per_edit=per_edit)
        sub, _ = _pairs_subset(cpde_images('train', mask_method, profile, root, device), cfg); inv = cached_inversion(bb, sub, DCLIP_STEPS)
        t0 = time.time(); unet, k0, hist = train_diffusionclip(bb, sub, inv, clip, edit, per_edit, epochs=epochs)
        save_lora(d, unet); save_json({'k0': k0, 'seconds': time.time() - t0}, d/'info.json'); hist.to_csv(d/'history.csv', index=False)
    path = cached_dir('cpde-diffusionclip', key, build)
    unet = copy.deepcopy(bb.unet); add_lora(unet, DCLIP_RANK); load_lora(unet, path)
    return unet.eval(), json.loads((path/'info.json').read_text())['k0'], bb


# %% [markdown]
# ## Editing a folder (the `dermnb edit` command)
#
# `edit_folder` edits every image of a folder and writes the results under the input names, at the input size. The
# model edits at its own resolution, 64 px in the quick profile. For the whole-image methods (Asyrp, w/ SCT,
# DiffusionCLIP) the result is resized back. For the mask-guided ones (CPDE, w/ Masking), `paste_edit` puts the
# resized edit inside the lesion onto the original's own full-resolution pixels. It uses the same dilation and
# feathering as `composite_edit`, scaled to the image, so the context keeps the original's detail and not the
# 64-px reconstruction. Masks come from
# `masks_dir` (`<stem>_segmentation.png`, the ISIC naming) or a segmenter; a mask that covers nothing or the whole image
# gets a warning (the edit is still defined: it then acts on the whole image, or nowhere for the masked methods), a mask
# whose size differs from its image is an error naming the file, and no image is written before every input checked.

# %%
#| export
MASK_WARN = (0.002, 0.98)     # warn below 0.2% or above 98% of the image

def folder_edit_set(images_dir:str|Path, # input images
                    masks_dir:str|Path|None=None, # <stem>_segmentation.png masks; None = segment
                    mask_method:str='diffseg-distilled', # segmenter when there are no masks
                    profile:str='quick', # profile (image size, segmenter)
                    root:str|Path|None=None, # data root (segmenter training)
                    device:str='auto' # device
                   )->tuple:
    "(EditSet, original PIL images, files) of a folder, with masks checked and warnings for degenerate ones."
    files = image_files(images_dir); ims = [load_image(f) for f in files]; size = get_profile(profile).image_size
    if masks_dir is not None:
        ms = []
        for f, im in zip(files, ims):
            mp = Path(masks_dir)/f'{f.stem}_segmentation.png'
            if not mp.is_file(): raise DataError(f"{mp}: no mask for {f.name} (expected <stem>_segmentation.png in {masks_dir})")
            ms.append(load_mask(mp, size=im.size, binarize=True))
        src = 'given'
    else:
        try: ms = segment_masks(ims, mask_method, profile, root, device)
        except DermnbError as e:
            raise DermnbError(f"{images_dir}: no --masks and no segmenter for them ({e})") from e
        src = mask_method
    for f, m in zip(files, ms):
        fr = float(np.asarray(m).mean())
        if fr < MASK_WARN[0] or fr > MASK_WARN[1]:
            warnings.warn(f"{f}: its mask covers {fr:.1%} of the image; the edit is still applied (masked methods then change "
                          f"{'nothing' if fr < MASK_WARN[0] else 'everything'})")
    X = torch.stack([image_to_tensor(fit_square(im, size, 'squash')) for im in ims])
    M = torch.stack([torch.from_numpy(np.asarray(fit_square(Image.fromarray(np.asarray(m)), size, 'squash', is_mask=True)) > 0).float()[None] for m in ms])
    return EditSet([f.stem for f in files], X, M, [src] * len(files)), ims, files, [np.asarray(m) > 0 for m in ms]


# %%
#| export
def paste_edit(orig:Image.Image, # the original image, full size
               edited:torch.Tensor, # its edit (3, s, s) in [-1, 1], at the model's resolution
               mask:np.ndarray, # the lesion mask at the original's size (H, W), bool
               dilate:float=2, # pixels added around the lesion, at the model's resolution
               feather:float=1. # edge softening, pixels at the model's resolution
              )->Image.Image:
    "The edit resized to the original's size inside the (dilated, feathered) lesion; the original's own pixels outside it."
    W, H = orig.size; k = max(W, H) / edited.shape[-1]
    up = image_to_tensor(tensor_to_image(edited).resize((W, H), Image.BICUBIC))[None]
    m = torch.from_numpy(np.asarray(mask, dtype=bool)).float()[None, None]
    return tensor_to_image(composite_edit(image_to_tensor(orig)[None], up, m, round(dilate * k), feather * k)[0])


# %%
#| export
def edit_folder(images_dir:str|Path, # input images
                out_dir:str|Path, # edited images are written here under the input names
                attribute:str, # one of ATTRIBUTES
                direction:str, # 'add' or 'remove'
                method:str='cpde', # 'cpde', 'asyrp', 'masking', 'sct' or 'diffusionclip'
                masks_dir:str|Path|None=None, # masks; None = segment with `mask_method`
                mask_method:str='diffseg-distilled', # segmenter without masks
                profile:str='quick', # profile
                root:str|Path|None=None, # data root
                device:str='auto', # device
                seed:int=0, # sampling seed
                strength:float=1. # Δh scale at sampling (h-space methods; Asyrp's `hs_coeff_delta_h`)
               )->list:
    "Edit every image of a folder (trained editors are cached on first use); returns the written files."
    e = Edit(attribute, direction)
    es, ims, files, full_masks = folder_edit_set(images_dir, masks_dir, mask_method, profile, root, device)
    if method == 'diffusionclip':
        if strength != 1: raise DermnbError("--strength scales an h-space Δh; the DiffusionCLIP-style method has none (use cpde, asyrp, masking or sct)")
        unet, k0, bb = load_diffusionclip(e, profile, root, device)
        edited = apply_diffusionclip(bb, unet, k0, cached_inversion(bb, es, DCLIP_STEPS)); masked = False
    else:
        ed, cfg, conds, bb, _ = load_editor(method, profile, root, device)
        j = [tuple(x) for x in cfg.edits].index((e.attribute, e.direction))
        edited = apply_editor(bb, ed, cfg, es, cached_inversion(bb, es, cfg.steps), torch.full((len(es),), j), conds, seed=seed,
                              strength=strength, composite=False); masked = cfg.masked
    out = []
    for f, im, x, m in zip(files, ims, edited, full_masks):
        y = paste_edit(im, x, m) if masked else tensor_to_image(x).resize(im.size, Image.BICUBIC)
        out.append(save_image(y, Path(out_dir)/f.name))
    return out


# %% [markdown]
# `eval_edit_folders` scores a folder of edited images against their originals (matched by file name) inside and
# outside given masks: FID on the standard Inception, S_dir (the concept-aware DermCLIP), NS-LPIPS, and n; this backs
# `dermnb eval edit`. Images are compared at the edited images' size.

# %%
#| export
def eval_edit_folders(orig_dir:str|Path, # original images
                      edited_dir:str|Path, # edited images, same file names
                      masks_dir:str|Path, # <stem>_segmentation.png lesion masks
                      attribute:str, # the edit's attribute
                      direction:str, # 'add' or 'remove'
                      clip:ClipEncoder|None=None, # the S_dir CLIP; default the concept-aware DermCLIP
                      profile:str='quick', # for the default CLIP
                      root:str|Path|None=None, # data root
                      device:str='auto' # device
                     )->dict:
    "{'fid', 's_dir', 'ns_lpips', 'n'} of an edited folder against its originals."
    from dermnb.metrics import fid_from_features, inception_features
    e = Edit(attribute, direction); ed = {f.name: f for f in image_files(edited_dir)}
    orig = [f for f in image_files(orig_dir) if f.name in ed]
    if not orig: raise DataError(f"{edited_dir}: no edited image matches a file name in {orig_dir}")
    if clip is None:
        from dermnb.lesiongen import load_concept_dermclip
        clip = load_concept_dermclip(profile, root, 'cpu')
    A, B, M = [], [], []
    for f in orig:
        b = load_image(ed[f.name]); a = load_image(f).resize(b.size, Image.BICUBIC)
        mp = Path(masks_dir)/f'{f.stem}_segmentation.png'
        if not mp.is_file(): raise DataError(f"{mp}: no mask for {f.name}")
        m = Image.fromarray(load_mask(mp, binarize=True)).resize(b.size, Image.NEAREST)
        A.append(image_to_tensor(a)); B.append(image_to_tensor(b)); M.append(torch.from_numpy(np.asarray(m) > 0).float()[None])
    A, B, M = torch.stack(A), torch.stack(B), torch.stack(M)
    with torch.no_grad(): sd = clip_direction_similarity(clip, A, B, *e.texts).mean().item()
    fa, fb = inception_features((A + 1) / 2, device=device), inception_features((B + 1) / 2, device=device)
    return {'fid': float(fid_from_features(fa, fb)) if len(A) > 1 else float('nan'), 's_dir': sd,
            'ns_lpips': float(ns_lpips((A + 1) / 2, (B + 1) / 2, M[:, 0], device=device).mean()), 'n': len(A)}


# %%
with tempfile.TemporaryDirectory() as d:
    d = Path(d); (d/'orig').mkdir(); (d/'masks').mkdir(); (d/'ed').mkdir()
    for r in ph2_few[:3]:
        load_image(r.image).save(d/'orig'/f'{r.id}.png'); Image.fromarray(load_mask(r.mask)).save(d/'masks'/f'{r.id}_segmentation.png')
        load_image(r.image).resize((64, 64)).save(d/'ed'/f'{r.id}.png')
    res = eval_edit_folders(d/'orig', d/'ed', d/'masks', 'streaks', 'add', clip=tclip, device='cpu')
    test_eq(res['n'], 3); assert res['ns_lpips'] < .05 and np.isfinite(res['fid'])        # unedited: no change outside
    es_f, ims_f, _, fm_f = folder_edit_set(d/'orig', d/'masks')
    test_eq(es_f.mask_source, ['given'] * 3); test_eq(fm_f[0].shape, ims_f[0].size[::-1])
    pe = np.asarray(paste_edit(ims_f[0], -torch.ones(3, 64, 64), fm_f[0])).astype(int)    # a black edit, pasted at full size
    r_ = 6 * math.ceil(max(ims_f[0].size) / 64)                                        # beyond dilation (2 k) + blur (3 k)
    far = ~F.max_pool2d(torch.from_numpy(fm_f[0]).float()[None, None], 2 * r_ + 1, 1, r_)[0, 0].bool().numpy()
    test_eq(pe[far], np.asarray(ims_f[0]).astype(int)[far])                             # the context: the original's own pixels
    assert far.mean() > .2 and pe[fm_f[0]].mean() < 8                                   # the lesion: the edit
    Image.new('L', (256, 192), 0).save(d/'masks'/f'{ph2_few[0].id}_segmentation.png')
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always'); folder_edit_set(d/'orig', d/'masks')
    assert any('covers 0.0%' in str(x.message) for x in w)
    Image.new('L', (10, 10), 0).save(d/'masks'/f'{ph2_few[1].id}_segmentation.png')
    test_fail(lambda: folder_edit_set(d/'orig', d/'masks'), contains='differs from its image')
    test_fail(lambda: edit_folder(d/'orig', d/'out', 'sparkles', 'add', masks_dir=d/'masks'), contains='known attributes')
    test_fail(lambda: edit_folder(d/'orig', d/'out', 'streaks', 'add', mask_method='none'), contains='no --masks and no segmenter')
    assert not (d/'out').exists()                                                     # nothing written
