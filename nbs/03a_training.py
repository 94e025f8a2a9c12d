# %% [markdown]
# # Training diffusion models
#
# > One trainer for every denoiser: unconditional, class- or text-conditional, pixel or latent space, from scratch or
# > LoRA; on `accelerate` (one CPU, one GPU, several GPUs or machines), with EMA, accumulation, mixed precision on GPU,
# > budgets, atomic checkpoints and exact resume.
#
# The shared base model of the quick profile and its evaluation are in the next notebook, `03b_base`.

# %%
#| default_exp training

# %%
#| export
from __future__ import annotations
import os, json, math, time, random, shutil, warnings, contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence
import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file, load_file
from tqdm.auto import tqdm
from fastcore.basics import patch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, PartialState
from diffusers.training_utils import EMAModel
from diffusers.optimization import get_scheduler
from dermnb.core import (Config, DermnbError, DataError, WeightsMissingError, TrainingDivergedError, atomic_save, save_json,
                         cached_dir, cache_root, get_device, seed_everything, CPU_BATCH)
from dermnb.diffusion import (Backbone, make_unet, make_scheduler, load_ae, load_text_encoder, load_sd_pipeline,
                              unet_eps, add_lora, save_lora, load_lora, widen_unet_io, LORA_FILE, UNET_LORA_TARGETS)

# %%
from fastcore.test import test_eq, test_ne, test_fail, test_close
import tempfile
from dermnb.core import make_generator
torch.manual_seed(0); torch.set_num_threads(1)   # tiny test models: threads only contend on a shared CPU


# %% [markdown]
# ## The training config
#
# A trained model is cached by its config, so the config holds everything the result depends on: what data
# (`data`, a name the caller chooses, e.g. `'isic2018_task1+isic2019:train'`), which space and conditioning, the UNet's
# size, the optimisation, and the time budget. The UNet is built from the config with `cfg.seed`, so a config fully
# determines the initial weights. `base` names a model to fine-tune: a saved Backbone folder, `sd:<id or path>` for a
# Stable Diffusion pipeline, or `cached:<config hash>` for a model trained into this cache (the quick base model, say),
# which keeps the config, and so its cache key, free of machine paths. The batch size is the *global* micro-batch: with several processes (`accelerate
# launch`), each takes an equal share of it, so a config defines the same optimisation, and the same model up to float
# rounding, on one CPU or eight GPUs. `base` fine-tunes an existing model instead: a saved backbone folder, or `sd:<id or
# path>` for a Stable Diffusion pipeline; with `lora_rank > 0` only LoRA adapters are trained.

# %%
#| export
@dataclass(frozen=True)
class TrainConfig(Config):
    "Everything a diffusion training run depends on (its stable hash keys the model cache)."
    data:str='custom'              # name of the training data (part of the cache key; the caller keeps it truthful)
    space:str='pixel'              # 'pixel' or 'latent'
    ae:str='taef2'                 # latent autoencoder: 'taef2' or an SD model id/path (space='latent')
    image_size:int=64              # side of the square training images, pixels
    cond:str='none'                # 'none', 'class' or 'text'
    num_classes:int=0              # number of classes (cond='class'); unknown labels (-1) train the null class
    text_encoder:str='minilm'      # text encoder name (cond='text'), see `dermnb.diffusion.TEXT_ENCODERS`
    channels:tuple=(64, 128, 128)  # UNet channels per level
    layers_per_block:int=1         # resnet layers per level
    attn_levels:tuple|None=None    # levels with (cross-)attention; default all but the first
    head_dim:int=32                # channels per attention head
    num_train_timesteps:int=1000   # T
    t_range:tuple=()               # (lo, hi): draw training timesteps in [lo, hi) (a method that infers in a band trains there); () = all of [0, T)
    t_range_p:float=1.             # share of each batch drawn from t_range (the rest uniform over [0, T))
    beta_schedule:str='linear'     # noise schedule ('linear', 'scaled_linear', 'squaredcos_cap_v2')
    prediction_type:str='epsilon'  # UNet target ('epsilon' or 'v_prediction')
    base:str=''                    # fine-tune: '' (from scratch), a saved Backbone folder, or 'sd:<model id or path>'
    lora_rank:int=0                # >0: train only LoRA adapters of this rank on the UNet attention
    lora_alpha:float=0.            # LoRA alpha (0 = rank)
    widen:int=0                    # extra zero-initialised input/output channels on the base UNet (SkinDualGen's mask latents)
    loss:str='mse'                 # 'mse' (v/noise MSE), or the name (and settings) of a loss passed as `loss_fn`
    steps:int=1000                 # optimizer steps
    batch_size:int=16              # images per micro-batch, summed over processes (each takes batch_size / num_processes)
    grad_accum:int=1               # micro-batches per optimizer step
    lr:float=2e-4                  # AdamW learning rate (after warm-up)
    warmup:int=50                  # linear warm-up steps
    lr_schedule:str='constant_with_warmup' # diffusers `get_scheduler` name: 'constant_with_warmup', 'cosine', 'linear', ...
    weight_decay:float=0.          # AdamW weight decay
    max_grad_norm:float=1.         # gradient clipping (0 = off)
    ema_decay:float=0.999          # EMA decay cap (with diffusers' EMA warm-up); 0 = no EMA
    p_uncond:float=0.1             # condition dropout for classifier-free guidance
    flip:bool=True                 # random horizontal flips (latents: both flips are encoded once)
    mixed_precision:str='no'       # 'no', 'fp16' or 'bf16'; only used on CUDA
    max_minutes:float=0.           # training-loop time budget, minutes (0 = none); checkpoint and stop when spent
    snapshot_minutes:tuple=()      # also save the EMA model after these many minutes of training (snapshots/<m>min)
    snapshot_steps:tuple=()        # also save the EMA model after these optimizer steps (snapshots/step<k>); reproducible
    ckpt_every:int=500             # checkpoint interval, steps
    keep_ckpts:int=2               # checkpoints kept
    log_every:int=10               # loss-curve interval, steps
    seed:int=0                     # seeds the weights, data order, noise and dropout

RESUME_FREE = ('steps', 'max_minutes', 'snapshot_minutes', 'snapshot_steps', 'ckpt_every', 'keep_ckpts', 'log_every')
LR_SCHEDULES = ('constant_with_warmup', 'constant', 'linear', 'cosine', 'cosine_with_restarts', 'polynomial')


# %% [markdown]
# Problems in the config are caught before any work: unknown options, LoRA on a model without a base, and image
# sizes the UNet cannot halve down to its bottleneck.

# %%
#| export
def check_config(cfg:TrainConfig # the config to validate
                )->TrainConfig:
    "Raise `DermnbError` for invalid or inconsistent settings; return the config."
    def need(ok, msg):
        if not ok: raise DermnbError(f"TrainConfig: {msg}")
    need(cfg.space in ('pixel', 'latent'), f"space must be 'pixel' or 'latent', not {cfg.space!r}")
    need(cfg.cond in ('none', 'class', 'text'), f"cond must be 'none', 'class' or 'text', not {cfg.cond!r}")
    need(cfg.cond != 'class' or cfg.num_classes > 0, "cond='class' needs num_classes > 0")
    need(cfg.mixed_precision in ('no', 'fp16', 'bf16'), f"mixed_precision must be 'no', 'fp16' or 'bf16'")
    need(cfg.lora_rank == 0 or cfg.base, "lora_rank > 0 needs a base model to adapt (base=...)")
    need(cfg.widen == 0 or (cfg.base and cfg.space == 'latent'), "widen > 0 needs a latent base model to widen (base=...)")
    need(cfg.steps > 0 and cfg.batch_size > 0 and cfg.grad_accum > 0, "steps, batch_size and grad_accum must be positive")
    need(cfg.lr_schedule in LR_SCHEDULES, f"lr_schedule must be one of {LR_SCHEDULES}, not {cfg.lr_schedule!r}")
    need(not cfg.t_range or (len(cfg.t_range) == 2 and 0 <= cfg.t_range[0] < cfg.t_range[1] <= cfg.num_train_timesteps),
         f"t_range must be () or (lo, hi) with 0 <= lo < hi <= {cfg.num_train_timesteps}, not {cfg.t_range!r}")
    need(0 <= cfg.t_range_p <= 1, f"t_range_p must be in [0, 1], not {cfg.t_range_p}")
    if not cfg.base:
        f = (8 if cfg.space == 'latent' else 1) * 2 ** (len(cfg.channels) - 1)
        need(cfg.image_size % f == 0, f"image_size {cfg.image_size} must be a multiple of {f} "
             f"({'8x latent downsampling x ' if cfg.space == 'latent' else ''}{len(cfg.channels) - 1} UNet halvings)")
    return cfg


# %%
test_eq(check_config(TrainConfig()).image_size, 64)
test_fail(lambda: check_config(TrainConfig(space='latent', image_size=48, channels=(32, 64, 64))), contains='multiple of 32')
test_fail(lambda: check_config(TrainConfig(cond='class')), contains='num_classes')
test_fail(lambda: check_config(TrainConfig(lora_rank=4)), contains='base')
test_fail(lambda: check_config(TrainConfig(lr_schedule='sawtooth')), contains='lr_schedule')
test_fail(lambda: check_config(TrainConfig(t_range=(500, 100))), contains='t_range')
test_ne(TrainConfig().hash(), TrainConfig(lr=1e-4).hash())


# %% [markdown]
# ## Building the model from the config
#
# From scratch: the UNet (seeded), the scheduler, and for latent space the named AE; for text, the named text encoder
# (or any `encode_text(list[str]) -> (B,L,D)` callable the caller passes). Fine-tuning starts from the base's
# backbone; with `lora_rank > 0` only the LoRA parameters train. `build_backbone` returns the backbone and the
# list of parameters to optimise.

# %%
#| export
@torch.no_grad()
def _text_dim(te:Callable)->int: return te(['']).shape[-1]

WIDE_LORA_TARGETS = UNET_LORA_TARGETS + ('conv1', 'conv2')   # a widened model's new channels flow through the resnets too

def _widen(bb:Backbone, cfg:TrainConfig, dev)->Backbone:
    "Widen the base UNet by `cfg.widen` channels and give it the config's (wider) AE, keeping the base's latent scaling."
    old = bb.ae; widen_unet_io(bb.unet, cfg.widen); bb.ae = load_ae(cfg.ae, dev)
    if bb.ae.latent_channels != bb.unet.config.in_channels:
        raise DermnbError(f"ae {cfg.ae!r} has {bb.ae.latent_channels} latent channels, the widened UNet takes {bb.unet.config.in_channels}")
    C = old.latent_channels
    with torch.no_grad(): bb.ae.shift[:C].copy_(old.shift); bb.ae.scale[:C].copy_(old.scale)
    return bb

def _load_base(base:str, device)->Backbone:
    if base.startswith('sd:'): return Backbone.from_pipeline(load_sd_pipeline(base[3:], device=device))
    if base.startswith('cached:'):                   # a model of this cache, by its config hash: machine-independent
        path = cache_root()/'diffusion'/base[len('cached:'):]
        if not path.is_dir(): raise WeightsMissingError(f"{path}: the base model {base!r} is not in the cache; train it first "
                                                        "(e.g. `dermnb train base`)")
        return load_trained(path, device)
    return Backbone.load(base, device=device)

def build_backbone(cfg:TrainConfig, # the training config
                   device:str|torch.device='cpu', # device
                   encode_text:Callable|None=None # text encoder overriding `cfg.text_encoder`
                  )->tuple[Backbone, list]:
    "The backbone to train (seeded from `cfg.seed`) and its trainable parameters."
    dev = get_device(device); check_config(cfg)
    if cfg.base:
        bb = _load_base(cfg.base, dev)
        if encode_text is not None: bb.text_encoder = encode_text
        got = (bb.kind, 'latent' if bb.ae is not None else 'pixel', bb.image_size)
        if got != (cfg.cond, cfg.space, cfg.image_size):
            raise DermnbError(f"base {cfg.base!r} is a {got[0]}-conditional {got[1]}-space model at {got[2]} px, but the config "
                              f"says cond={cfg.cond!r}, space={cfg.space!r}, image_size={cfg.image_size}")
        seed_everything(cfg.seed)                    # the adapters' init: the config's, whatever ran in the process before
    else:
        ae = load_ae(cfg.ae, dev) if cfg.space == 'latent' else None
        te = (encode_text or load_text_encoder(cfg.text_encoder, dev)) if cfg.cond == 'text' else None
        seed_everything(cfg.seed)
        unet = make_unet(cfg.cond, sample_size=cfg.image_size // (ae.factor if ae else 1), in_channels=ae.latent_channels if ae else 3,
                         block_out_channels=cfg.channels, layers_per_block=cfg.layers_per_block, attn_levels=cfg.attn_levels,
                         num_classes=cfg.num_classes, head_dim=cfg.head_dim,
                         cross_attention_dim=(getattr(te, 'dim', None) or _text_dim(te)) if te is not None else 384)
        sch = make_scheduler(cfg.num_train_timesteps, cfg.beta_schedule, cfg.prediction_type, clip_sample=cfg.space == 'pixel')
        bb = Backbone(unet.to(dev), sch, ae, te, cfg.num_classes, cfg.image_size)
    if cfg.widen: _widen(bb, cfg, dev)
    if cfg.lora_rank:
        params = add_lora(bb.unet, cfg.lora_rank, cfg.lora_alpha or None, WIDE_LORA_TARGETS if cfg.widen else None)
        if cfg.widen:                                # the widened convolutions train in full, next to the adapters
            io = [p for m in (bb.unet.conv_in, bb.unet.conv_out) for p in m.parameters()]
            for q in io: q.requires_grad_(True)
            params += io
    else: params = [p for p in bb.unet.parameters() if p.requires_grad]
    bb.unet.train()
    return bb, params


# %%
tiny = dict(image_size=8, channels=(16, 32), head_dim=8, batch_size=4, steps=6, warmup=2, log_every=1, ckpt_every=100, lr=1e-3)
bb, params = build_backbone(TrainConfig(cond='class', num_classes=3, **tiny))
test_eq((bb.kind, bb.num_classes), ('class', 3)); test_eq(len(params), len(list(bb.unet.parameters())))
bb2, _ = build_backbone(TrainConfig(cond='class', num_classes=3, **tiny))
test_eq(list(bb.unet.parameters())[5].detach(), list(bb2.unet.parameters())[5].detach())   # the config fixes the weights


# %% [markdown]
# ## Checkpoints: one atomic safetensors file each
#
# A checkpoint is one `.safetensors` file holding the trainable weights, the EMA weights, the optimizer's state
# tensors, the RNG states (the trainer's generator, torch, CUDA, NumPy) and the AE's latent scaling; the rest (step,
# config, optimizer hyper-parameters, LR-schedule and grad-scaler state, Python's RNG) is JSON in the file's metadata.
# `atomic_save` writes it under a temporary name and renames it, so a crash mid-write leaves the previous checkpoint
# as it was, and a file with a final name is always complete.

# %%
#| export
def _np_rng()->tuple[torch.Tensor, dict]:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return torch.from_numpy(keys.astype(np.int64)), {'name': name, 'pos': pos, 'has_gauss': has_gauss, 'cached': cached}

def save_checkpoint(path:str|Path, # destination .safetensors file
                    tensors:dict, # name -> tensor
                    meta:dict # JSON-able metadata
                   )->Path:
    "Write tensors + JSON metadata as one safetensors file, atomically."
    ts = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    return atomic_save(path, lambda t: save_file(ts, str(t), metadata={'dermnb': json.dumps(meta)}))


# %%
#| export
def load_checkpoint(path:str|Path # a file written by `save_checkpoint`
                   )->tuple[dict, dict]:
    "Read (tensors, metadata) back; an unreadable file is a `DataError`."
    try:
        with safe_open(str(path), framework='pt') as f:
            return {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()['dermnb'])
    except Exception as e: raise DataError(f"{path}: unreadable checkpoint ({type(e).__name__}: {e})") from e


# %%
with tempfile.TemporaryDirectory() as tdir:
    f = Path(tdir)/'c.safetensors'
    save_checkpoint(f, {'a': torch.arange(3), 's': torch.tensor(2.)}, {'step': 7})
    t_, m_ = load_checkpoint(f); test_eq(t_['a'], torch.arange(3)); test_eq(m_['step'], 7)
    test_fail(lambda: save_checkpoint(f, {'a': torch.arange(3)}, {'bad': object()}))    # a failed save...
    test_eq(load_checkpoint(f)[1]['step'], 7)                                           # ...leaves the old file intact
    test_eq([p.name for p in Path(tdir).iterdir()], ['c.safetensors'])
    (Path(tdir)/'bad.safetensors').write_bytes(b'junk'); test_fail(lambda: load_checkpoint(Path(tdir)/'bad.safetensors'), contains='bad.safetensors')


# %% [markdown]
# ## Data: materialised once
#
# The trainer reads items of any torch `Dataset` of dicts (`image` in [-1,1], `label`, `caption`), such as
# `dermnb.data.DermDataset` (build it with `augment=False`: the trainer flips with its own generator). It reads every
# item once: pixel images are kept as one tensor; in latent space only the latents are kept (both flips encoded,
# so flipping stays exact), and a model without a base fits the AE's latent scaling on them. Captions are encoded once
# per distinct caption. A wrong image size is a `DataError` naming both sizes.

# %%
#| export
@dataclass
class TrainData:
    "A materialised training set: images or latents (N, K, C, H, W) with K flip variants, labels, caption indices."
    x:torch.Tensor                  # (N, K, C, H, W) pixels or normalised latents; K = 2 holds the flipped copy
    labels:torch.Tensor             # (N,) long, -1 = unknown
    caption_idx:torch.Tensor        # (N,) index into `text_emb` (0 = the empty caption), or (N, K) for K captions per item
    text_emb:torch.Tensor|None=None # (n_captions, L, D) embeddings, row 0 the empty caption
    prep_s:float=0.                 # seconds spent materialising

    def __len__(self): return len(self.x)


# %%
#| export
@torch.no_grad()
def _read_data(dataset, bb:Backbone, cfg:TrainConfig, chunk:int, progress:bool, images:torch.Tensor|None=None)->TrainData:
    "Read every item once: check sizes; raw latents (both flips) or pixels (`images` when given); labels; caption embeddings."
    n = len(dataset)
    xs, labels, caps = [], [], []
    for s in tqdm(range(0, n, chunk), desc='prepare data', disable=not progress, leave=False):
        items = [dataset[i] for i in range(s, min(n, s + chunk))]
        x = torch.stack([it['image'] for it in items]).float()
        if x.shape[-2:] != (cfg.image_size, cfg.image_size):
            raise DataError(f"dataset item {s} is {x.shape[-1]}x{x.shape[-2]} but the config's image_size is "
                            f"{cfg.image_size}: build the dataset with size={cfg.image_size}")
        if images is None:
            v = torch.stack([x, x.flip(-1)], 1) if cfg.flip and bb.ae is not None else x[:, None]
            if bb.ae is not None:   # in cache-sized sub-batches (see dermnb.core.CPU_BATCH)
                v = torch.stack([torch.cat([bb.ae.encode_raw(b.to(bb.device)).float().cpu() for b in v[:, k].split(CPU_BATCH)])
                                 for k in range(v.shape[1])], 1)
            xs.append(v)
        labels += [int(it.get('label', -1)) for it in items]
        caps += [[str(c) for c in it['caption']] if isinstance(it.get('caption'), (list, tuple)) else [str(it.get('caption', ''))] for it in items]
    if images is not None and len(images) != n: raise DataError(f"{len(images)} cached image latents for a dataset of {n} items")
    uniq = [''] + sorted({c for cs in caps for c in cs} - {''}); idx = {c: i for i, c in enumerate(uniq)}
    emb = None
    if cfg.cond == 'text':
        emb = torch.cat([bb.text_encoder(uniq[i:i + chunk]).float().cpu()
                         for i in tqdm(range(0, len(uniq), chunk), desc='encode captions', disable=not progress, leave=False)])
    K = max(len(cs) for cs in caps)                  # several captions per item: (N, K), an item's list repeated to K
    ci = torch.tensor([[idx[cs[k % len(cs)]] for k in range(K)] for cs in caps]) if K > 1 else torch.tensor([idx[cs[0]] for cs in caps])
    return TrainData(torch.cat(xs) if images is None else images, torch.tensor(labels), ci, emb)


# %% [markdown]
# Encoding a few thousand images with TAEF2 takes minutes on a CPU, and every model trained on the same data in the
# same latent space needs the same latents. With a `cache_key` (which `train_cached` derives from the config's data
# name, space, AE, size, flips and text encoder) the raw result is kept in the dermnb cache (`train-data/<hash>`).
# The latent scaling is fitted afterwards, on the raw latents of the (unflipped) training images.
#
# Two runs that train on the same images with different captions (LesionGen's ablation: concept-rich against
# label-only captions) have different data names but the same latents. A dataset that names its pixels truthfully in
# an `images_key` attribute (for `DermDataset`s: `data.array_cache_key`) shares them: the raw latents are kept once
# more under `train-images/<hash of images_key, space, AE, size, flips>`, and the second run only embeds its captions.

# %%
#| export
def _read_latents_shared(dataset, bb:Backbone, cfg:TrainConfig, chunk:int, progress:bool, cache_root=None)->TrainData:
    "`_read_data`, taking the raw latents from the `train-images` cache when the dataset names its pixels (`images_key`)."
    ik = getattr(dataset, 'images_key', None)
    if ik is None: return _read_data(dataset, bb, cfg, chunk, progress)
    got = {}
    def build(p):
        got['r'] = _read_data(dataset, bb, cfg, chunk, progress)
        save_checkpoint(p/'images.safetensors', {'x': got['r'].x}, {'n': len(got['r'].x)})
    key = {'images': ik, **{k: getattr(cfg, k) for k in ('space', 'ae', 'image_size', 'flip')}}
    x = load_checkpoint(cached_dir('train-images', key, build, root=cache_root)/'images.safetensors')[0]['x']
    return got['r'] if 'r' in got else _read_data(dataset, bb, cfg, chunk, progress, images=x)   # encoded once either way


# %%
#| export
def prepare_data(dataset, # torch Dataset of dicts with 'image' (3,S,S) in [-1,1], 'label', 'caption'
                 bb:Backbone, # the backbone (its AE encodes; its text encoder embeds captions)
                 cfg:TrainConfig, # the config (image size, flips, conditioning)
                 fit_scaling:bool|int=True, # fit the AE's latent shift/scale on these images; an int k fits channels k.. only
                 cache_key:dict|None=None, # keep the raw data in the dermnb cache under this key
                 cache_root:str|Path|None=None, # cache root override
                 chunk:int=64, # items encoded at once
                 progress:bool=True # tqdm bars
                )->TrainData:
    "Materialise a training set: checked sizes, normalised latents (both flips) or pixels, labels, caption embeddings."
    t0 = time.time()
    if len(dataset) < cfg.batch_size: raise DataError(f"training set has {len(dataset)} items, fewer than batch_size {cfg.batch_size}")
    if cache_key is None: d = _read_data(dataset, bb, cfg, chunk, progress)
    else:
        def build(p):
            r = _read_latents_shared(dataset, bb, cfg, chunk, progress, cache_root)
            T = {'x': r.x, 'labels': r.labels, 'caption_idx': r.caption_idx, **({'text_emb': r.text_emb} if r.text_emb is not None else {})}
            save_checkpoint(p/'data.safetensors', T, {'n': len(r.x)})
        T, _ = load_checkpoint(cached_dir('train-data', cache_key, build, root=cache_root)/'data.safetensors')
        d = TrainData(T['x'], T['labels'], T['caption_idx'], T.get('text_emb'))
    if bb.ae is not None:
        if fit_scaling is not False:
            k = 0 if fit_scaling is True else int(fit_scaling)
            z = d.x[:, 0, k:].transpose(0, 1).flatten(1)
            bb.ae.shift[k:].copy_(z.mean(1)); bb.ae.scale[k:].copy_(z.std(1).clamp_min(1e-6))
        d.x = (d.x - bb.ae.shift.cpu().view(1, 1, -1, 1, 1)) / bb.ae.scale.cpu().view(1, 1, -1, 1, 1)
    d.prep_s = time.time() - t0
    return d


# %% [markdown]
# A tiny dataset of real-looking items for the tests: smooth random blobs (fixed by a seed), labels and captions.

# %%
class ToyDataset(torch.utils.data.Dataset):
    def __init__(self, n=8, size=8, seed=0, nan_at=None):
        g = torch.Generator().manual_seed(seed)
        self.x = F.interpolate(torch.rand(n, 3, 2, 2, generator=g), size=(size, size), mode='bilinear') * 2 - 1
        self.nan_at = nan_at
    def __len__(self): return len(self.x)
    def __getitem__(self, i):
        x = self.x[i].clone()
        if i == self.nan_at: x[0, 0, 0] = float('nan')
        return {'image': x, 'label': i % 4 - 1, 'caption': ['a melanoma', 'a nevus', ''][i % 3], 'id': str(i)}

d = prepare_data(ToyDataset(), bb, TrainConfig(cond='class', num_classes=3, **tiny), progress=False)
test_eq(d.x.shape, (8, 1, 3, 8, 8)); test_eq(d.labels.tolist()[:4], [-1, 0, 1, 2]); test_eq(d.text_emb, None)
test_fail(lambda: prepare_data(ToyDataset(size=16), bb, TrainConfig(**tiny), progress=False), contains='16x16')
with tempfile.TemporaryDirectory() as root:
    cc = TrainConfig(cond='class', num_classes=3, **tiny)
    d1 = prepare_data(ToyDataset(), bb, cc, cache_key={'data': 'toy'}, cache_root=root, progress=False)
    d2 = prepare_data(ToyDataset(n=12, seed=5), bb, cc, cache_key={'data': 'toy'}, cache_root=root, progress=False)
    test_eq(d2.x, d1.x); test_eq(d1.x, d.x)          # same key, the cached data (so the key must name the data truthfully)

class _Captioned(ToyDataset):                           # the same pixels under other captions, naming them
    images_key = 'toy-pixels'
    def __init__(self, word, **kw): super().__init__(**kw); self.word = word
    def __getitem__(self, i): return {**super().__getitem__(i), 'caption': f'{self.word} {i}'}
with tempfile.TemporaryDirectory() as root:
    ct = TrainConfig(space='latent', cond='text', image_size=16, channels=(32, 32), head_dim=16, batch_size=4)
    bbt, _ = build_backbone(ct, 'cpu', lambda texts: torch.stack([torch.full((5, 12), len(t) / 10.) for t in texts]))
    calls, enc = [], bbt.ae.encode_raw
    bbt.ae.encode_raw = lambda x: calls.append(len(x)) or enc(x)
    prep = lambda w, **kw: prepare_data(_Captioned(w, size=16), bbt, ct, fit_scaling=False, progress=False, **kw)
    da = prep('a', cache_key={'data': 'toy-a'}, cache_root=root); n_a = len(calls)
    db = prep('bbb', cache_key={'data': 'toy-b'}, cache_root=root)
    test_eq(len(calls), n_a); assert n_a > 0            # the second caption set encoded no image
    test_eq(db.x, da.x); test_ne(db.text_emb[1:], da.text_emb[1:])
    test_eq(da.x, prep('a').x)                          # and the shared latents are the uncached ones


# %% [markdown]
# ## Data order, noise and conditioning dropout
#
# Determinism that survives a restart comes from *stateless* data order: micro-batch k (counted over the whole run)
# takes its slice of the permutation of epoch `k // batches_per_epoch`, which is drawn from a generator seeded by
# `(seed, epoch)`. The position in the data is then a function of the step, and resuming needs no sampler state.

# %%
#| export
def batch_indices(k:int, # global micro-batch index (step * grad_accum + micro)
                  n:int, # dataset size
                  batch_size:int, # micro-batch size
                  seed:int=0 # data-order seed
                 )->torch.Tensor:
    "Indices of micro-batch k: a slice of a per-epoch permutation seeded by (seed, epoch); incomplete batches dropped."
    per_epoch = n // batch_size
    epoch, j = divmod(k, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return perm[j * batch_size:(j + 1) * batch_size]


# %%
ep = torch.cat([batch_indices(k, 10, 3) for k in range(3)])
test_eq(len(set(ep.tolist())), 9)                                   # one epoch: no repeats (last incomplete batch dropped)
test_eq(batch_indices(4, 10, 3), batch_indices(4, 10, 3)); test_ne(batch_indices(3, 10, 3), batch_indices(0, 10, 3))


# %% [markdown]
# All randomness of an optimizer step is drawn at once, for the whole effective batch (`batch_size * grad_accum`),
# from the trainer's own generator: timesteps, noise, flips and condition dropout. Splitting the batch into
# micro-batches then changes nothing but rounding, which is what makes gradient accumulation exactly equivalent to a
# bigger batch.

# %%
#| export
def draw_batch(data:TrainData, # the materialised data
               idx:torch.Tensor, # item indices of the effective batch
               cfg:TrainConfig, # config (conditioning, dropout, flips)
               bb:Backbone, # backbone (scheduler, null class)
               gen:torch.Generator # the trainer's generator (CPU)
              )->dict:
    "Clean inputs, noise, timesteps and conditions for one optimizer step (tensors on CPU)."
    B = len(idx)
    t = torch.randint(0, bb.scheduler.config.num_train_timesteps, (B,), generator=gen)
    if cfg.t_range:   # a band drawn densely: DiffSeg trains where it infers
        band = torch.randint(cfg.t_range[0], cfg.t_range[1], (B,), generator=gen)
        t = torch.where(torch.rand(B, generator=gen) < cfg.t_range_p, band, t)
    flip = torch.rand(B, generator=gen) < 0.5 if cfg.flip else torch.zeros(B, dtype=torch.bool)
    drop = torch.rand(B, generator=gen) < cfg.p_uncond
    x = data.x[idx]
    if x.shape[1] == 2: x0 = torch.where(flip.view(-1, 1, 1, 1), x[:, 1], x[:, 0])        # encoded flips
    else: x0 = torch.where(flip.view(-1, 1, 1, 1), x[:, 0].flip(-1), x[:, 0])
    noise = torch.randn(x0.shape, generator=gen)
    out = {'x0': x0, 'noise': noise, 't': t}
    if cfg.cond == 'class':
        lab = data.labels[idx].clone(); lab[(lab < 0) | (lab >= cfg.num_classes) | drop] = cfg.num_classes
        out['cond'] = lab
    elif cfg.cond == 'text':
        ci = data.caption_idx[idx].clone()
        if ci.ndim == 2: ci = ci.gather(1, torch.randint(ci.shape[1], (B, 1), generator=gen))[:, 0]   # one wording per item and step
        ci[drop] = 0
        out['cond'] = data.text_emb[ci]
    return out


# %%
cfg_c = TrainConfig(cond='class', num_classes=3, p_uncond=0.5, **tiny)
b1 = draw_batch(d, batch_indices(0, 8, 4), cfg_c, bb, make_generator(0))
b2 = draw_batch(d, batch_indices(0, 8, 4), cfg_c, bb, make_generator(0))
test_eq(b1['noise'], b2['noise']); test_eq(b1['cond'], b2['cond'])
test_eq(b1['x0'].shape, (4, 3, 8, 8)); assert set(b1['cond'].tolist()) <= {0, 1, 2, 3}
tb = draw_batch(d, batch_indices(0, 8, 8), cfg_c.replace(t_range=(150, 450)), bb, make_generator(0))['t']
assert ((tb >= 150) & (tb < 450)).all()                      # a training band is sampled densely
test_eq(b1['noise'], draw_batch(d, batch_indices(0, 8, 4), cfg_c.replace(t_range=()), bb, make_generator(0))['noise'])


# %% [markdown]
# `TrainState` gathers what a checkpoint must restore, in and out of the flat format: weights, EMA, optimizer,
# LR schedule, grad scaler and RNGs.

# %%
#| export
@dataclass
class TrainState:
    "The mutable state of a run: model params, EMA, optimizer, LR schedule, grad scaler, generator."
    params:list                 # trainable parameters (in a fixed order)
    names:list                  # their names
    opt:torch.optim.Optimizer
    sched:Any                   # LR scheduler
    ema:EMAModel|None
    scaler:Any                  # the accelerator's GradScaler (fp16 on CUDA only), else None
    gen:torch.Generator         # noise / timestep / dropout generator
    ae:Any=None                 # LatentAE whose scaling is saved

    def tensors_meta(self, step:int, cfg:TrainConfig, elapsed:float)->tuple[dict, dict]:
        "Flatten everything into (tensors, JSON metadata)."
        T = {f'model.{n}': p for n, p in zip(self.names, self.params)}
        osd = self.opt.state_dict(); oscal = {}
        for pid, st in osd['state'].items():
            for k, v in st.items():
                if torch.is_tensor(v): T[f'opt.{pid}.{k}'] = v
                else: oscal[f'{pid}.{k}'] = v
        if self.ema is not None: T.update({f'ema.{i}': p for i, p in enumerate(self.ema.shadow_params)})
        T['rng.gen'], T['rng.torch'] = self.gen.get_state(), torch.get_rng_state()
        if torch.cuda.is_available(): T.update({f'rng.cuda.{i}': s for i, s in enumerate(torch.cuda.get_rng_state_all())})
        T['rng.np'], np_meta = _np_rng()
        if self.ae is not None: T['ae.shift'], T['ae.scale'] = self.ae.shift, self.ae.scale
        ema_meta = {k: v for k, v in self.ema.state_dict().items() if k != 'shadow_params'} if self.ema is not None else None
        meta = {'step': step, 'elapsed_s': elapsed, 'config': cfg.to_dict(), 'opt_groups': osd['param_groups'],
                'opt_scalars': oscal, 'sched': self.sched.state_dict(), 'scaler': self.scaler.state_dict() if self.scaler else {},
                'ema': ema_meta, 'rng_np': np_meta, 'rng_py': random.getstate()}
        return T, meta


# %%
#| export
@patch
def restore(self:TrainState, T:dict, # checkpoint tensors (see `tensors_meta`)
            meta:dict # checkpoint metadata
           ):
    "Load a checkpoint's tensors and metadata into this state (weights, EMA, optimizer, schedules, RNGs)."
    with torch.no_grad():
        for n, p in zip(self.names, self.params): p.copy_(T[f'model.{n}'])
    state = {}
    for k, v in T.items():
        if k.startswith('opt.'): _, pid, key = k.split('.', 2); state.setdefault(int(pid), {})[key] = v
    for k, v in meta['opt_scalars'].items(): pid, key = k.split('.', 1); state.setdefault(int(pid), {})[key] = v
    self.opt.load_state_dict({'state': state, 'param_groups': meta['opt_groups']})
    self.sched.load_state_dict(meta['sched'])
    if self.scaler is not None and meta['scaler']: self.scaler.load_state_dict(meta['scaler'])
    if self.ema is not None:
        shadow = [T[f'ema.{i}'].to(p.device) for i, p in enumerate(self.params)]
        self.ema.load_state_dict({**meta['ema'], 'shadow_params': shadow})
    if self.ae is not None: self.ae.shift.copy_(T['ae.shift']); self.ae.scale.copy_(T['ae.scale'])
    self.gen.set_state(T['rng.gen']); torch.set_rng_state(T['rng.torch'])
    if torch.cuda.is_available() and 'rng.cuda.0' in T:
        torch.cuda.set_rng_state_all([T[f'rng.cuda.{i}'] for i in range(torch.cuda.device_count()) if f'rng.cuda.{i}' in T])
    n = meta['rng_np']; np.random.set_state((n['name'], T['rng.np'].numpy().astype(np.uint32), n['pos'], n['has_gauss'], n['cached']))
    v, s, g = meta['rng_py']; random.setstate((v, tuple(s), g))


# %% [markdown]
# On resume, the checkpoint's config must match the requested one, except for the fields that only say how long or how
# often (`RESUME_FREE`: steps, budget, intervals). Anything else would silently mix two experiments, so it is an error
# that lists the differences.

# %%
#| export
def check_resume(saved:dict, # config dict stored in the checkpoint
                 cfg:TrainConfig, # requested config
                 path:str|Path='' # checkpoint file, for the message
                ):
    "Raise `DermnbError` when the checkpoint's config differs from `cfg` outside `RESUME_FREE`."
    now = cfg.to_dict()
    diff = {k: (saved.get(k), now[k]) for k in now if k not in RESUME_FREE and saved.get(k) != now[k]}
    if diff: raise DermnbError(f"{path}: cannot resume, the checkpoint was trained with a different config: "
                               + ', '.join(f"{k}={a!r} there, {b!r} now" for k, (a, b) in diff.items())
                               + ". Use another output folder, or resume=False to start over.")


# %%
#| export
def find_checkpoint(out_dir:str|Path # training output folder
                   )->Path|None:
    "The newest complete checkpoint in `out_dir/checkpoints`, or None."
    cks = sorted((Path(out_dir)/'checkpoints').glob('ckpt-*.safetensors'))
    return cks[-1] if cks else None


# %%
test_fail(lambda: check_resume(TrainConfig(lr=1.).to_dict(), TrainConfig(lr=2.), 'x.safetensors'), contains='lr=1.0 there')
check_resume(TrainConfig(steps=10).to_dict(), TrainConfig(steps=20))     # training longer is fine


# %% [markdown]
# ## The trainer, on accelerate
#
# `train_diffusion` runs on 🤗 `accelerate`, so the same loop trains on one CPU, one GPU (mixed precision) or several
# GPUs or machines (distributed data-parallel, launched with `accelerate launch`). For each optimizer step it draws
# the step's randomness for the whole global batch (every process draws the same, from the same seed), each process
# takes its share of every micro-batch, and DDP averages the gradients, so the step equals the single-process step
# up to float rounding. Then: gradient clipping, AdamW with the config's warm-up schedule (diffusers'
# `get_scheduler`), the EMA, the loss log (averaged over processes), and checkpoints every `ckpt_every` steps, at the
# time budget, at `stop_at` and at the end, written by the main process only. A non-finite loss on any process stops
# every process at once with a `TrainingDivergedError` before anything is saved from that step. At the end the EMA
# weights are saved as the model (`model/`, a `Backbone` folder, or `lora/` for LoRA runs), with `loss.csv` and
# `train_state.json`.
#
# `make_accelerator` builds the `Accelerator`. Mixed precision needs CUDA: on a CPU the run warns and trains in float32.
# In a single process (a notebook that trains several models one after another) the accelerator state is reset
# first, since accelerate refuses to change the precision of an existing state; under `accelerate launch` it is kept.

# %%
#| export
def make_accelerator(cfg:TrainConfig, # the run's config (mixed precision)
                     device:str|torch.device='auto' # 'cpu' forces the CPU; otherwise accelerate's device (CUDA if any)
                    )->Accelerator:
    "An `Accelerator` for a training run: CPU or GPU, mixed precision on CUDA only, distributed under `accelerate launch`."
    cpu = get_device(device).type == 'cpu'
    mp = cfg.mixed_precision
    if mp != 'no' and cpu:
        warnings.warn(f"mixed_precision={mp!r} needs CUDA; training in float32 on the CPU"); mp = 'no'
    if not PartialState._shared_state or not PartialState().use_distributed:
        AcceleratorState._reset_state(reset_partial_state=True)
    return Accelerator(cpu=cpu, mixed_precision=mp)


# %%
acc0 = make_accelerator(TrainConfig(), 'cpu')
test_eq((acc0.device.type, acc0.num_processes, acc0.mixed_precision, acc0.is_main_process), ('cpu', 1, 'no', True))
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter('always'); acc1 = make_accelerator(TrainConfig(mixed_precision='bf16'), 'cpu')
assert acc1.mixed_precision == 'no' and any('needs CUDA' in str(x.message) for x in w)

# %% [markdown]
# **Why not bfloat16 on the CPU too.** This CPU has AVX512-BF16, and `benchmarks/cpu_bf16_training.py`
# measured what it would buy the quick profile's training steps (gradients agree with float32 to a cosine above
# 0.999): DiffSeg's 32-px pixel UNet, whose convolutions dominate, trains about 1.6x faster; the segmentation U-Net
# about 1.2x; LesionGen's LoRA on the 8×8 latent base model not at all (too small a model for the casts to pay). Only the
# DiffSeg trainings would gain much, and switching would change every cached model and every measured number, so the
# quick profile stays in float32; the cell reads the ratios from the benchmark's CSV.

# %%
from dermnb.core import results_csv
bf = results_csv('benchmarks/results/cpu_bf16_training.csv').set_index('model')
sp = {k.split(' ')[0]: v for k, v in bf.speedup.items()}
assert sp['diffseg'] > 1.4 and 1.05 < sp['segmentation'] < 1.4 and sp['LesionGen'] < 1.1 and (bf.grad_cosine > .999).all()
bf[['speedup', 's_per_step_fp32', 's_per_step_bf16', 'grad_cosine', 'loss_rel_diff']].round(4)


# %% [markdown]
# The loss of one micro-batch: this process's rows of the step's batch, noised with the step's noise at the step's
# timesteps, and the MSE against the UNet's target (noise or v). The model is the accelerator-prepared UNet (the DDP
# wrapper when distributed), under the accelerator's autocast.

# %%
#| export
def diffusion_loss(model:nn.Module, # the (prepared) UNet
                   bb:Backbone, # backbone (its scheduler)
                   cfg:TrainConfig, # prediction type
                   b:dict, # the step's batch from `draw_batch`
                   sl:slice, # this process's rows of one micro-batch
                   acc:Accelerator # the run's accelerator (device, autocast)
                  )->torch.Tensor:
    "The diffusion MSE of rows `sl` of the step's batch."
    dev = acc.device
    x0, noise, t = b['x0'][sl].to(dev), b['noise'][sl].to(dev), b['t'][sl].to(dev)
    x_t = bb.scheduler.add_noise(x0, noise, t)
    target = noise if cfg.prediction_type == 'epsilon' else bb.scheduler.get_velocity(x0, noise, t)
    cond = b['cond'][sl].to(dev) if 'cond' in b else None
    with acc.autocast(): pred = unet_eps(model, x_t, t, cond)
    return F.mse_loss(pred.float(), target.float())


# %% [markdown]
# **The optimizer.** AdamW, fused into one kernel where torch offers it (CUDA, and CPU since torch 2.4): on a small
# UNet the per-parameter loop of the default AdamW is a visible share of a CPU step, and fusing it is what lets the
# trainer afford EMA and gradient clipping and still match a plain diffusers loop (`benchmarks/diffusion_train.py`,
# whose ratios `03b_base` prints). Same algorithm, same state dict; results differ from the unfused optimizer only by
# float rounding.

# %%
#| export
def make_optimizer(params:list, # trainable parameters (all on one device)
                   cfg:TrainConfig # learning rate and weight decay
                  )->torch.optim.AdamW:
    "AdamW for `params`, fused where this torch supports it on their device."
    try: return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    except (RuntimeError, TypeError, ValueError): return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


# %%
ps = [torch.nn.Parameter(torch.randn(5, 3, generator=torch.Generator().manual_seed(0))) for _ in range(2)]
qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
fused, plain = make_optimizer(ps, TrainConfig(lr=1e-2, weight_decay=.1)), torch.optim.AdamW(qs, lr=1e-2, weight_decay=.1)
assert fused.defaults['fused'], 'torch should offer fused AdamW on CPU'
for i in range(5):
    for a, b in zip(ps, qs): a.grad = torch.full_like(a, float(i + 1)); b.grad = a.grad.clone()
    fused.step(); plain.step()
for a, b in zip(ps, qs): test_close(a, b, eps=1e-6)
test_eq(sorted(fused.state_dict()['state'][0]), sorted(plain.state_dict()['state'][0]))


# %% [markdown]
# The loop itself, split in three: setup (build, prepare, restore), the optimizer step, and the run. Setup returns
# everything a step needs in one namespace. The data is materialised by the main process first (so that a data cache
# is built once and read by the others), and a checkpoint is restored before `accelerator.prepare`, so that DDP
# starts every process from the restored weights.

# %%
#| export
def data_cache_key(cfg:TrainConfig # the training config
                  )->dict:
    "What the materialised training data depends on (for the `train-data` cache)."
    return {k: getattr(cfg, k) for k in ('data', 'space', 'ae', 'image_size', 'flip', 'cond', 'text_encoder', 'base')}


# %%
#| export
def _setup(cfg, dataset, out, device, resume, encode_text, progress, data_cache, cache_root=None):
    acc = make_accelerator(cfg, device)
    if cfg.batch_size % acc.num_processes:
        raise DermnbError(f"batch_size {cfg.batch_size} is the global micro-batch and must divide evenly over "
                          f"{acc.num_processes} processes")
    bb, params = build_backbone(cfg, acc.device, encode_text)
    names = [n for n, p in bb.unet.named_parameters() if p.requires_grad]
    ck = find_checkpoint(out) if resume else None
    saved = load_checkpoint(ck) if ck else None
    if saved: check_resume(saved[1]['config'], cfg, ck)
    if not resume and acc.is_main_process: shutil.rmtree(out/'checkpoints', ignore_errors=True)
    key = data_cache_key(cfg) if data_cache and encode_text is None else None
    with acc.main_process_first():
        fit = False if saved else True if not cfg.base else (bb.unet.config.in_channels - cfg.widen) if cfg.widen else False
        data = prepare_data(dataset, bb, cfg, fit_scaling=fit, cache_key=key, cache_root=cache_root,
                            progress=progress and acc.is_main_process)
    opt = make_optimizer(params, cfg)
    sched = get_scheduler(cfg.lr_schedule, opt, num_warmup_steps=cfg.warmup, num_training_steps=cfg.steps)
    ema = EMAModel(params, decay=cfg.ema_decay, use_ema_warmup=True, power=2/3, foreach=True) if cfg.ema_decay > 0 else None
    st = TrainState(params, names, opt, sched, ema, None, torch.Generator().manual_seed(cfg.seed), bb.ae)
    step, elapsed, rows = 0, 0., []
    if saved:
        st.restore(*saved); step, elapsed = saved[1]['step'], saved[1]['elapsed_s']
        if (out/'loss.csv').exists(): rows = [r for r in pd.read_csv(out/'loss.csv').to_dict('records') if r['step'] <= step]
    model, st.opt = acc.prepare(bb.unet, opt)           # DDP wrapper when distributed; the scheduler is stepped by us
    st.scaler = acc.scaler
    if saved and st.scaler is not None and saved[1]['scaler']: st.scaler.load_state_dict(saved[1]['scaler'])
    return dict(bb=bb, model=model, st=st, data=data, acc=acc, step=step, elapsed=elapsed, rows=rows, resumed_from=ck)


# %%
#| export
def _all_finite(acc:Accelerator, x:torch.Tensor)->bool:
    "Whether `x` is finite on every process (one collective when distributed)."
    ok = torch.isfinite(x.detach()).all().float().view(1)
    return bool(acc.gather(ok).min() > 0) if acc.num_processes > 1 else bool(ok)

def _opt_step(cfg, bb, model, st, data, acc, step, loss_fn=None)->float:
    "One optimizer step (all micro-batches, this process's share of each); returns the loss averaged over processes."
    B, A, P, r = cfg.batch_size, cfg.grad_accum, acc.num_processes, acc.process_index
    Bp = B // P
    idx = torch.cat([batch_indices(step * A + m, len(data), B, cfg.seed) for m in range(A)])
    b = draw_batch(data, idx, cfg, bb, st.gen)              # the global batch: the same on every process
    st.opt.zero_grad(set_to_none=True); total = torch.zeros((), device=acc.device)
    for m in range(A):
        with (acc.no_sync(model) if m < A - 1 else contextlib.nullcontext()):   # sync gradients once per step
            loss = (loss_fn or diffusion_loss)(model, bb, cfg, b, slice(m * B + r * Bp, m * B + (r + 1) * Bp), acc) / A
            if not _all_finite(acc, loss):
                raise TrainingDivergedError(f"loss became {loss.item()} at step {step + 1} (micro-batch {m}); lower lr "
                    f"(now {cfg.lr}), use mixed_precision='no', or check the data for NaNs. Nothing from this step was saved.")
            acc.backward(loss); total += loss.detach()
    if cfg.max_grad_norm > 0: acc.clip_grad_norm_(st.params, cfg.max_grad_norm)
    st.opt.step(); st.sched.step()
    if st.ema is not None: st.ema.step(st.params)
    return (acc.reduce(total, 'mean') if P > 1 else total).item()


# %% [markdown]
# Saving the outputs: the loss curve after every checkpoint, and at the end the EMA weights as the model. Old
# checkpoints are removed only after a newer one is complete. Only the main process calls these.

# %%
#| export
def _checkpoint(cfg, st, out, step, elapsed, rows):
    T, meta = st.tensors_meta(step, cfg, elapsed)
    f = save_checkpoint(out/'checkpoints'/f'ckpt-{step:08d}.safetensors', T, meta)
    for old in sorted((out/'checkpoints').glob('ckpt-*.safetensors'))[:-max(1, cfg.keep_ckpts)]: old.unlink()
    atomic_save(out/'loss.csv', lambda t: pd.DataFrame(rows, columns=['step', 'loss', 'lr', 'elapsed_s', 'images']).to_csv(t, index=False))
    return f

def _save_model(cfg, bb, st, out, info=None):
    "EMA weights into the UNet, then save the backbone (or the LoRA adapter) into `out/model` (or `out/lora`)."
    if st.ema is not None: st.ema.store(st.params); st.ema.copy_to(st.params)
    name = 'lora' if cfg.lora_rank else 'model'
    tmp = out/f'.{name}.tmp'; shutil.rmtree(tmp, ignore_errors=True)
    if cfg.lora_rank:
        save_lora(tmp, bb.unet)
        if cfg.widen:                                   # the widened convolutions and the wider AE's scaling
            save_file({f'{m}.{k}': v.detach().cpu().contiguous() for m in ('conv_in', 'conv_out') for k, v in getattr(bb.unet, m).state_dict().items()},
                      str(tmp/'io.safetensors'))
            save_json({'shift': bb.ae.shift.tolist(), 'scale': bb.ae.scale.tolist()}, tmp/'ae.json')
    else: bb.save(tmp)
    if info: save_json(info, tmp/'info.json')
    shutil.rmtree(out/name, ignore_errors=True); os.replace(tmp, out/name)
    if st.ema is not None: st.ema.restore(st.params)


# %%
#| export
class TrainProgress:
    "Progress bar of a run over its steps, with the ETA, the loss and, for runs with a time budget, the budget left."
    def __init__(self, cfg:TrainConfig, # the run's config (`steps`, `max_minutes`)
                 step:int=0, # step the run starts from (resumed runs)
                 elapsed:float=0., # training seconds already spent (resumed runs)
                 enabled:bool=True, # show the bar
                 file=None, # stream for the bar; default stderr
                 mininterval:float=1. # seconds between redraws (a notebook or log keeps every redraw)
                ):
        self.budget = cfg.max_minutes * 60 if cfg.max_minutes > 0 else 0.
        self.bar = tqdm(total=cfg.steps, initial=step, unit='step', desc='train', leave=False, disable=not enabled,
                        file=file, mininterval=mininterval,
                        bar_format='{l_bar}{bar}| {n_fmt}/{total_fmt} steps [{elapsed}, ETA {remaining}{postfix}]')
        self.update(step, elapsed); self.bar.refresh()     # the first draw, with the budget left

    def update(self, step:int, # steps done
               elapsed:float, # training seconds spent
               loss:float|None=None # latest logged loss
              ):
        "Move the bar to `step`, show the loss and the budget left (redrawn at most every `mininterval`)."
        post = {**({'loss': f'{loss:.4f}'} if loss is not None else {}),
                **({'budget left': tqdm.format_interval(max(0., self.budget - elapsed))} if self.budget else {})}
        self.bar.set_postfix(post, refresh=False)
        if self.bar.disable: self.bar.n = step
        else: self.bar.update(step - self.bar.n)      # tqdm's update throttles the redraws

    def close(self): self.bar.close()


# %% [markdown]
# A run stops at `steps` or when its time budget is spent, whichever comes first. The bar counts steps, so its ETA
# is right when the steps end the run (the quick models: their budget is only a safety cap), and a budgeted run
# also shows the budget left, which is the real remaining time when the budget ends it first. Redraws are throttled
# to one a second, since notebooks and logs keep every one of them.

# %%
import io
cfg_b = TrainConfig(max_minutes=2, steps=4000)
pb = TrainProgress(cfg_b, enabled=False); pb.update(step=40, elapsed=30., loss=.5)
test_eq((pb.bar.total, pb.bar.n), (4000, 40)); test_eq(pb.bar.postfix, 'loss=0.5000, budget left=01:30')
pb.update(step=200, elapsed=150.); test_eq(pb.bar.postfix, 'budget left=00:00')          # spent: the run stops here
ps = TrainProgress(TrainConfig(steps=50), step=10, enabled=False); ps.update(step=25, elapsed=3.)
test_eq((ps.bar.total, ps.bar.n, ps.bar.postfix), (50, 25, ''))                      # no budget, nothing about it
buf = io.StringIO(); pt = TrainProgress(cfg_b, file=buf)
for i in range(500): pt.update(step=i + 1, elapsed=i * 1e-3)                         # 500 fast steps...
pt.close(); out = buf.getvalue()
assert out.count('ETA') < 5 and '/4000 steps' in out and 'budget left=02:00' in out, out   # ...a few redraws
pb.close(); ps.close()


# %%
#| export
def train_diffusion(cfg:TrainConfig, # what to train
                    dataset, # torch Dataset of dicts: 'image' (3,S,S) in [-1,1], 'label', 'caption'
                    out_dir:str|Path, # run folder: checkpoints/, loss.csv, train_state.json, model/ (or lora/)
                    device:str|torch.device='auto', # 'cpu' forces the CPU; else accelerate's device (CUDA when present)
                    resume:bool=True, # continue from the newest checkpoint in out_dir (same config)
                    stop_at:int|None=None, # stop (with a checkpoint) after this step, e.g. to test resuming
                    encode_text:Callable|None=None, # text encoder overriding cfg.text_encoder
                    data_cache:bool=False, # keep the materialised data in the cache (cfg.data must name it truthfully)
                    cache_root:str|Path|None=None, # cache root for `data_cache`
                    progress:bool=True, # tqdm bars (main process only)
                    loss_fn:Callable|None=None # the loss `cfg.loss` names, with `diffusion_loss`'s signature (default: MSE)
                   )->dict:
    "Train a diffusion model as configured (one or several processes); returns the run summary (also train_state.json)."
    if (cfg.loss == 'mse') != (loss_fn is None):
        raise DermnbError(f"config loss={cfg.loss!r} " + ("needs its loss_fn" if loss_fn is None else "is the default MSE; name the loss in the config"))
    out = Path(out_dir); out.mkdir(parents=True, exist_ok=True)
    S = _setup(cfg, dataset, out, device, resume, encode_text, progress, data_cache, cache_root)
    bb, model, st, data, acc, step, rows = S['bb'], S['model'], S['st'], S['data'], S['acc'], S['step'], S['rows']
    main = acc.is_main_process
    start_step, stopped, t_loop = step, 'done', time.time()
    elapsed = lambda: S['elapsed'] + time.time() - t_loop          # training-loop time, summed over resumed runs
    last = min(stop_at if stop_at is not None else cfg.steps, cfg.steps)
    bar = TrainProgress(cfg, step, S['elapsed'], progress and main)
    acc_loss, nacc, loss = 0., 0, None
    bb.unet.train()
    while step < last:
        acc_loss += _opt_step(cfg, bb, model, st, data, acc, step, loss_fn); nacc += 1; step += 1
        if step % cfg.log_every == 0 or step == cfg.steps:
            loss = acc_loss / nacc
            rows.append({'step': step, 'loss': loss, 'lr': st.sched.get_last_lr()[0], 'elapsed_s': round(elapsed(), 3),
                         'images': step * cfg.batch_size * cfg.grad_accum})
            acc_loss, nacc = 0., 0
        bar.update(step, elapsed(), loss)
        if main:
            for m in cfg.snapshot_minutes:
                if elapsed() >= m * 60 and not (out/'snapshots'/f'{m:g}min').exists():
                    _save_model(cfg, bb, st, out/'snapshots'/f'{m:g}min', {'step': step, 'elapsed_s': elapsed(), 'minutes': m})
            if step in cfg.snapshot_steps: _save_model(cfg, bb, st, out/'snapshots'/f'step{step}', {'step': step, 'elapsed_s': elapsed()})
        over = cfg.max_minutes > 0 and elapsed() >= cfg.max_minutes * 60
        if cfg.max_minutes > 0 and acc.num_processes > 1:            # every process stops at the same step
            over = bool(acc.reduce(torch.tensor(float(over), device=acc.device), 'sum') > 0)
        if over: stopped = 'time'
        elif step == stop_at and step < cfg.steps: stopped = 'stop_at'
        if main and (step % cfg.ckpt_every == 0 or step == cfg.steps or stopped != 'done'):
            _checkpoint(cfg, st, out, step, elapsed(), rows)
        if stopped != 'done': break
    bar.close()
    if stopped == 'time' and step < cfg.steps and main:
        warnings.warn(f"{out}: the {cfg.max_minutes:g}-minute budget stopped training at step {step} of {cfg.steps}; this model "
                      "differs from one trained to the end with the same config (a faster machine, or max_minutes=0, finishes it)")
    loop_s = time.time() - t_loop
    bb.unet.eval()
    summary = {'step': step, 'stopped': stopped, 'train_s': round(elapsed(), 2), 'prep_s': round(data.prep_s, 2),
               'images_per_s': round((step - start_step) * cfg.batch_size * cfg.grad_accum / max(loop_s, 1e-9), 2),
               'resumed_from': str(S['resumed_from'] or ''), 'final_loss': rows[-1]['loss'] if rows else None,
               'n_train': len(data), 'device': str(acc.device), 'num_processes': acc.num_processes, 'config': cfg.to_dict()}
    if main:
        if stopped != 'stop_at': _save_model(cfg, bb, st, out, {'step': step, 'elapsed_s': elapsed()})
        save_json(summary, out/'train_state.json')
    acc.wait_for_everyone()
    return summary


# %% [markdown]
# ### Tests of the trainer
#
# An unconditional pixel model trains, its loss falls, and the run leaves a loss curve, a checkpoint and a model that
# loads as a `Backbone` and samples.

# %%
with tempfile.TemporaryDirectory() as tdir:
    cfg = TrainConfig(data='toy', **{**tiny, 'steps': 30, 'lr': 3e-3})
    s = train_diffusion(cfg, ToyDataset(), tdir, device='cpu', progress=False)
    test_eq((s['step'], s['stopped']), (30, 'done'))
    curve = pd.read_csv(Path(tdir)/'loss.csv'); test_eq(len(curve), 30)
    assert curve.loss[-5:].mean() < curve.loss[:5].mean(), curve.loss.tolist()   # it learns
    assert find_checkpoint(tdir) is not None and (Path(tdir)/'model'/'backbone.json').exists()
    m = Backbone.load(Path(tdir)/'model')
    test_eq(m.sample(2, steps=3, generator=make_generator(0)).shape, (2, 3, 8, 8))
    print(f"tiny pixel model: loss {curve.loss[:5].mean():.3f} -> {curve.loss[-5:].mean():.3f}, {s['images_per_s']} images/s")


# %% [markdown]
# **Resume continues identically.** N steps straight, and N/2 steps + a restart from the checkpoint + N/2 steps, give
# the same weights, EMA and loss curve, bit for bit: the checkpoint carries the optimizer, EMA, RNG states and (by the
# step) the data position. Here with class conditioning, condition dropout, flips and gradient accumulation on.

# %%
def weights(d): return {k: v for k, v in load_checkpoint(find_checkpoint(d))[0].items() if k.startswith(('model.', 'ema.'))}
with tempfile.TemporaryDirectory() as da, tempfile.TemporaryDirectory() as db:
    cfg = TrainConfig(cond='class', num_classes=3, grad_accum=2, **{**tiny, 'batch_size': 2, 'steps': 6, 'ckpt_every': 100})
    train_diffusion(cfg, ToyDataset(), da, device='cpu', progress=False)
    s1 = train_diffusion(cfg, ToyDataset(), db, device='cpu', stop_at=3, progress=False)
    test_eq((s1['step'], s1['stopped']), (3, 'stop_at')); assert not (Path(db)/'model').exists()
    s2 = train_diffusion(cfg, ToyDataset(), db, device='cpu', progress=False)
    test_eq(s2['step'], 6); assert s2['resumed_from'].endswith('ckpt-00000003.safetensors')
    wa, wb = weights(da), weights(db)
    test_eq(sorted(wa), sorted(wb)); assert any(k.startswith('ema.') for k in wa)
    for k in wa: test_eq(wa[k], wb[k])                                             # identical, bit for bit
    test_eq(pd.read_csv(Path(da)/'loss.csv').loss.tolist(), pd.read_csv(Path(db)/'loss.csv').loss.tolist())
    test_fail(lambda: train_diffusion(cfg.replace(lr=5e-3), ToyDataset(), db, device='cpu', progress=False), contains='lr=')
    test_eq(train_diffusion(cfg.replace(steps=8), ToyDataset(), db, device='cpu', progress=False)['step'], 8)   # train on


# %% [markdown]
# **Gradient accumulation** over 2 micro-batches of 2 gives the same gradient as one batch of 4 (same images, noise and
# timesteps), up to rounding. (Compared on the gradients: Adam's first steps are nearly sign(gradient), which would
# turn rounding differences of near-zero gradients into full-size weight differences.)

# %%
def step_grads(cfg):
    acc = make_accelerator(cfg, 'cpu')
    bb, params = build_backbone(cfg, 'cpu'); data = prepare_data(ToyDataset(), bb, cfg, progress=False)
    opt = torch.optim.SGD(params, lr=0.)
    st = TrainState(params, [], opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.), None, None,
                    torch.Generator().manual_seed(cfg.seed))
    model, st.opt = acc.prepare(bb.unet, opt)
    loss = _opt_step(cfg, bb, model, st, data, acc, 0)
    return loss, [p.grad.clone() for p in params]
la, ga = step_grads(TrainConfig(**{**tiny, 'batch_size': 4}))
lb, gb = step_grads(TrainConfig(**{**tiny, 'batch_size': 2}, grad_accum=2))
test_close(la, lb, eps=1e-6)
for a, b in zip(ga, gb): test_close(a, b, eps=1e-6)
assert sum(g.abs().sum() for g in ga) > 0

# %% [markdown]
# **Budgets and failures.** A time budget (on the training loop's time) stops the run with a checkpoint and a saved
# model, and a later call with more budget goes on. Because where a time budget stops depends on the machine, a run it
# cuts short warns that its model differs from the config's full run: configs whose results are published fix
# `steps` and keep `max_minutes` only as a safety cap. Snapshots keep the EMA model at given steps (reproducible) or
# training times. A NaN in the data stops the run with a clear error and saves nothing from the bad step. A config
# mismatch on resume and a wrong image size are clear errors (tested above). Mixed precision is GPU-only.

# %%
with tempfile.TemporaryDirectory() as tdir, warnings.catch_warnings(record=True) as w:
    warnings.simplefilter('always')
    cfg = TrainConfig(**{**tiny, 'steps': 50, 'max_minutes': 1e-6, 'snapshot_minutes': (0.,)})
    s = train_diffusion(cfg, ToyDataset(), tdir, device='cpu', progress=False)
    test_eq((s['step'], s['stopped']), (1, 'time')); assert (Path(tdir)/'model').exists()
    assert any('stopped training at step 1 of 50' in str(x.message) for x in w), [str(x.message) for x in w]
    test_eq(json.loads((Path(tdir)/'snapshots'/'0min'/'model'/'info.json').read_text())['step'], 1)   # a snapshot
    test_eq(find_checkpoint(tdir).name, 'ckpt-00000001.safetensors')
    test_eq(train_diffusion(cfg.replace(max_minutes=0., steps=3), ToyDataset(), tdir, device='cpu', progress=False)['step'], 3)
with tempfile.TemporaryDirectory() as tdir:
    test_fail(lambda: train_diffusion(TrainConfig(**tiny), ToyDataset(nan_at=1), tdir, device='cpu', progress=False),
              contains='loss became nan')
    assert find_checkpoint(tdir) is None and not (Path(tdir)/'model').exists()
if not torch.cuda.is_available():
    with tempfile.TemporaryDirectory() as tdir, warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        s = train_diffusion(TrainConfig(**{**tiny, 'steps': 1}, mixed_precision='bf16'), ToyDataset(), tdir, device='cpu', progress=False)
    assert any('needs CUDA' in str(x.message) for x in w) and s['final_loss'] is not None

# %%
#| gpu
with tempfile.TemporaryDirectory() as tdir:
    s = train_diffusion(TrainConfig(**{**tiny, 'steps': 5}, mixed_precision='fp16'), ToyDataset(), tdir, device='cuda', progress=False)
    assert math.isfinite(s['final_loss']) and s['device'].startswith('cuda')

# %% [markdown]
# **Latent and text.** A text-conditional model on TAEF2 latents of real ISIC images (16 px, so 2x2 latents here) with
# the pretrained MiniLM text encoder: the AE's scaling is fitted on the training latents, saved with the model, and the
# loaded backbone samples decoded images under guidance.

# %%
from dermnb.data import get_split, DermDataset
recs = get_split('isic2018_task1', 'train')[:8]
ds16 = DermDataset(recs, size=16, caption_fn=lambda r: f"dermoscopy of a {r.diagnosis or 'skin lesion'}")
with tempfile.TemporaryDirectory() as tdir:
    cfg = TrainConfig(space='latent', cond='text', image_size=16, channels=(32, 32), head_dim=16, batch_size=4, steps=4, log_every=1)
    s = train_diffusion(cfg, ds16, tdir, device='cpu', progress=False)
    m = Backbone.load(Path(tdir)/'model')
    test_eq((m.kind, m.ae.name, m.text_encoder.name), ('text', 'taef2', 'minilm'))
    z = prepare_data(ds16, m, cfg, fit_scaling=False, progress=False).x[:, 0]
    test_close(z.mean(), 0., eps=0.05); test_close(z.std(), 1., eps=0.1)        # the saved scaling normalises them
    im = m.sample(cond=['dermoscopy of a melanoma'], guidance_scale=3., steps=3, generator=make_generator(0))
    test_eq(im.shape, (1, 3, 16, 16))

# %% [markdown]
# Any `encode_text(list[str]) -> (B, L, D)` callable can condition the model; its width sets the UNet's
# cross-attention width, and it is passed again when loading (the saved model only records its name).

# %%
enc12 = lambda texts: torch.stack([torch.full((5, 12), len(t) / 10.) for t in texts])
with tempfile.TemporaryDirectory() as tdir:
    train_diffusion(TrainConfig(cond='text', **{**tiny, 'steps': 2}), ToyDataset(), tdir, device='cpu', encode_text=enc12, progress=False)
    m = Backbone.load(Path(tdir)/'model', text_encoder=enc12)
    test_eq(m.unet.config.cross_attention_dim, 12)
    test_eq(m.sample(cond=['a nevus'], guidance_scale=2., steps=2).shape, (1, 3, 8, 8))
    test_fail(lambda: Backbone.load(Path(tdir)/'model'), contains='custom')


# %% [markdown]
# ## Loading trained models, and the model cache
#
# `load_trained` returns the `Backbone` of a finished run: the saved model, or for LoRA runs the base with the adapter
# loaded. `train_cached` trains through `core.cached_dir`: the same config returns the same cached model without
# training (and without building the dataset, which is passed as a function). The run itself happens in a stable work
# folder (`<cache>/diffusion-work/<hash>`), so an interrupted or budget-limited build resumes where it stopped. Under
# `accelerate launch` every process trains and the main process alone publishes the cache entry.

# %%
#| export
def load_trained(path:str|Path, # a run folder (train_diffusion's out_dir or a cache entry)
                 device:str|torch.device='cpu', # device
                 encode_text:Callable|None=None # text encoder, when the run used a custom one
                )->Backbone:
    "The trained backbone of a run (EMA weights; LoRA runs: base + adapter)."
    path = Path(path)
    if (path/'model'/'backbone.json').exists(): return Backbone.load(path/'model', device, text_encoder=encode_text)
    if (path/'lora'/LORA_FILE).exists():
        cfg = TrainConfig.from_dict(json.loads((path/'train_state.json').read_text())['config'])
        bb = _load_base(cfg.base, get_device(device))
        if encode_text is not None: bb.text_encoder = encode_text
        if cfg.widen:
            _widen(bb, cfg, get_device(device))
            io = load_file(str(path/'lora'/'io.safetensors'))
            for m in ('conv_in', 'conv_out'): getattr(bb.unet, m).load_state_dict({k.split('.', 1)[1]: v for k, v in io.items() if k.startswith(m + '.')})
            a = json.loads((path/'lora'/'ae.json').read_text())
            with torch.no_grad(): bb.ae.shift.copy_(torch.tensor(a['shift'])); bb.ae.scale.copy_(torch.tensor(a['scale']))
        load_lora(bb.unet, path/'lora'); return bb
    raise WeightsMissingError(f"{path}: no trained model (model/backbone.json or lora/{LORA_FILE}); train it first")


# %%
#| export
def train_cached(cfg:TrainConfig, # what to train; `cfg.data` must name the data truthfully
                 dataset_fn:Callable, # () -> dataset; called only when the model is not cached yet
                 device:str|torch.device='auto', # training device
                 root:str|Path|None=None, # cache root override
                 refresh:bool=False, # retrain even when cached
                 encode_text:Callable|None=None, # custom text encoder
                 progress:bool=True, # tqdm bars
                 loss_fn:Callable|None=None # the loss `cfg.loss` names (see `train_diffusion`)
                )->Path:
    "Train (or fetch from the cache) the model for `cfg`; returns its cache folder (use `load_trained`)."
    final, work = cache_root(root)/'diffusion'/cfg.hash(), cache_root(root)/'diffusion-work'/cfg.hash()
    if final.exists() and not refresh: return final
    train_diffusion(cfg, dataset_fn(), work, device=device, resume=not refresh, encode_text=encode_text,
                    data_cache=True, cache_root=root, progress=progress, loss_fn=loss_fn)    # every process of a distributed run trains
    state = PartialState()
    if state.is_main_process:                                                # one process publishes the entry
        def build(tmp:Path):
            for f in ('model', 'lora', 'snapshots', 'loss.csv', 'train_state.json'):
                if (work/f).exists(): (shutil.copytree if (work/f).is_dir() else shutil.copy2)(work/f, tmp/f)
        cached_dir('diffusion', cfg, build, root=root, refresh=True)
        shutil.rmtree(work, ignore_errors=True)
    state.wait_for_everyone()
    return final


# %%
with tempfile.TemporaryDirectory() as root:
    calls = []
    def ds_fn(): calls.append(1); return ToyDataset()
    cfg = TrainConfig(data='toy', **{**tiny, 'steps': 2})
    p1 = train_cached(cfg, ds_fn, device='cpu', root=root, progress=False)
    p2 = train_cached(cfg, ds_fn, device='cpu', root=root, progress=False)
    test_eq(p1, p2); test_eq(len(calls), 1)                              # the second call is a cache hit
    test_eq(load_trained(p1).kind, 'none'); assert (p1/'loss.csv').exists() and (p1/'config.json').exists()
    test_ne(train_cached(cfg.replace(lr=1e-4), ds_fn, device='cpu', root=root, progress=False), p1)
    test_fail(lambda: load_trained(root), contains='no trained model')

# %% [markdown]
# **LoRA fine-tuning** of a base model (here the tiny SD pipeline saved to disk, `base='sd:<path>'`) trains only the
# adapters, and saves them in diffusers' format: the pipeline's own `load_lora_weights` reads them.

# %%
from dermnb.diffusion import tiny_sd_pipeline, load_sd_pipeline
with tempfile.TemporaryDirectory() as sd_dir, tempfile.TemporaryDirectory() as tdir:
    tiny_sd_pipeline().save_pretrained(sd_dir)
    cfg = TrainConfig(space='latent', cond='text', image_size=16, base=f'sd:{sd_dir}', lora_rank=4, batch_size=4,
                      steps=3, lr=1e-2, log_every=1, ema_decay=0.)
    bbl, pl = build_backbone(cfg, 'cpu'); assert 0 < sum(p.numel() for p in pl) < sum(p.numel() for p in bbl.unet.parameters()) / 5
    train_diffusion(cfg, ToyDataset(size=16), tdir, device='cpu', progress=False)
    assert (Path(tdir)/'lora'/LORA_FILE).exists()
    pipe = load_sd_pipeline(sd_dir, device='cpu', local_files_only=True)
    x, e = torch.randn(1, 4, 8, 8), torch.randn(1, 16, 32)
    with torch.no_grad():
        before = pipe.unet(x, 10, encoder_hidden_states=e).sample
        pipe.load_lora_weights(str(Path(tdir)/'lora'))
        after = pipe.unet(x, 10, encoder_hidden_states=e).sample
        assert (after - before).abs().max() > 1e-4                                  # the trained adapter acts
        test_close(load_trained(tdir).unet(x, 10, encoder_hidden_states=e).sample, after, eps=1e-5)   # base + adapter
    test_fail(lambda: build_backbone(cfg.replace(image_size=32), 'cpu'), contains='16 px')


# %% [markdown]
# **Widening a base model** (SkinDualGen): a latent base model gets 32 zero-initialised input/output channels for mask
# latents and the dual AE (`taef2-dual`); with LoRA, the adapters (on the attention projections and, since the new
# channels must flow through the resnets, on their two convolutions: `WIDE_LORA_TARGETS`) and the widened convolutions train, the base's image
# scaling is kept while the mask half is fitted, and the reloaded model (base + widening + adapters) predicts what the
# trained one did. A config naming its own loss must come with it. The adapters' random initialisation is seeded by the
# config: it once came from the global RNG, so the same config gave a different model depending on what the process had
# run before (a SkinDualGen model trained twice in one process ended 60 steps at losses 2.4357 and 2.4348).

# %%
class ToyPairs(torch.utils.data.Dataset):
    "Real-looking 16-px images with a square 'lesion' mask rendered as 3 more channels."
    def __init__(self, n=8):
        g = torch.Generator().manual_seed(0); self.x = F.interpolate(torch.rand(n, 3, 2, 2, generator=g), size=(16, 16), mode='bilinear') * 2 - 1
    def __len__(self): return len(self.x)
    def __getitem__(self, i):
        m = torch.zeros(1, 16, 16); m[:, 4:12, 4 + i % 3:12] = 1
        return {'image': torch.cat([self.x[i], m.repeat(3, 1, 1) * 2 - 1]), 'label': -1, 'caption': 'a nevus'}
with tempfile.TemporaryDirectory() as d:
    base_cfg = TrainConfig(space='latent', cond='text', image_size=16, channels=(32, 32), head_dim=16, batch_size=4, steps=2, log_every=1)
    train_diffusion(base_cfg, ToyDataset(size=16), Path(d)/'base', device='cpu', progress=False)
    wcfg = TrainConfig(space='latent', ae='taef2-dual', cond='text', image_size=16, base=str(Path(d)/'base'/'model'), widen=32,
                       lora_rank=4, batch_size=4, steps=3, lr=1e-2, log_every=1, ema_decay=0.)
    wb, wp = build_backbone(wcfg, 'cpu')
    torch.manual_seed(123); torch.rand(7)                                          # another history of the global RNG...
    wb2, wp2 = build_backbone(wcfg, 'cpu')
    for a, b in zip(wp, wp2): test_eq(a.detach(), b.detach())                     # ...the same initial adapters
    test_eq((wb.unet.config.in_channels, wb.ae.latent_channels), (64, 64))
    base_bb = Backbone.load(Path(d)/'base'/'model'); test_close(wb.ae.scale[:32], base_bb.ae.scale)
    train_diffusion(wcfg, ToyPairs(), Path(d)/'wide', device='cpu', progress=False)
    back = load_trained(Path(d)/'wide')
    assert (Path(d)/'wide'/'lora'/'io.safetensors').exists() and not torch.equal(back.ae.scale[32:], wb.ae.scale[32:])
    test_close(back.ae.scale[:32], base_bb.ae.scale)                                 # the image scaling stayed the base's
    assert back.unet.conv_in.weight[:, 32:].abs().sum() > 0                          # the mask inputs learned something
    test_eq(back.sample(cond=['a nevus'], steps=2, generator=make_generator(0)).shape, (1, 6, 16, 16))
    test_fail(lambda: train_diffusion(wcfg.replace(loss='mine'), ToyPairs(), Path(d)/'x', device='cpu', progress=False), contains='needs its loss_fn')
