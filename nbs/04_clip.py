# %% [markdown]
# # CLIP
#
# > One CLIP interface (`encode_image`, `encode_text`, preprocess, tokenizer) over any CLIP, open_clip models loaded
# > by name and weights without downloads, and the two CLIP measures of edits: S_dir and the directional CLIP loss.
#
# The in-domain DermCLIP, trained in this project, comes in the next notebook (`04a_dermclip`); it plugs into the same
# interface.

# %%
#| default_exp clip

# %%
#| export
from __future__ import annotations
import os, logging, warnings, contextlib
from pathlib import Path
from typing import Callable, Sequence
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
import open_clip
from dermnb.core import DermnbError, DataError, WeightsMissingError, data_root, image_to_tensor
from dermnb.data import fit_square

# %%
import tempfile, json
import numpy as np
from fastcore.test import test_eq, test_ne, test_fail, test_close
from dermnb.data import get_split
torch.set_num_threads(1)        # the development machine is shared; tests stay on one core
ROOT = data_root()              # $DERMNB_DATA


# %% [markdown]
# ## One interface
#
# Every method that needs CLIP (S_dir for edit evaluation, the directional loss inside CPDE, caption scoring) talks to a
# `ClipEncoder`, whatever model is behind it. Images enter as dermnb tensors: `(B, 3, H, W)` in [-1, 1], the range the
# data layer and the diffusion backbone use. The encoder resizes them to the tower's input size and applies the
# tower's own normalisation *inside* `encode_image`, so the path from pixels to embedding is differentiable (the
# directional loss backpropagates through it into the edited image). `preprocess` turns a PIL image into such a
# tensor; `tokenizer` turns strings into token ids. Embeddings come back L2-normalised unless `normalize=False`.

# %%
#| export
class ClipEncoder(nn.Module):
    "One CLIP interface over any model with `encode_image(pixels)` / `encode_text(tokens)`; images in [-1, 1]."
    def __init__(self, model:nn.Module, # open_clip CLIP/CustomTextCLIP or DermCLIP
                 tokenizer:Callable, # list[str] -> LongTensor of token ids
                 image_size:int, # square side the image tower expects
                 mean:Sequence[float]=(.5, .5, .5), # per-channel mean of [0,1] pixels the tower was trained with
                 std:Sequence[float]=(.5, .5, .5), # per-channel std of [0,1] pixels
                 fit:str='crop', # how `preprocess` squares a PIL image: 'crop', 'pad' or 'squash' (see dermnb.data)
                 name:str='clip' # name used in tables and messages
                ):
        super().__init__()
        self.model, self.tokenizer, self.image_size, self.fit, self.name = model, tokenizer, int(image_size), fit, name
        self.register_buffer('mean', torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer('std', torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    @property
    def device(self)->torch.device: return self.mean.device

    def preprocess(self, img:Image.Image)->torch.Tensor:
        "PIL image -> (3, S, S) tensor in [-1, 1] at the tower's input size."
        return image_to_tensor(fit_square(img.convert('RGB'), self.image_size, self.fit))

    def pixels(self, images:torch.Tensor)->torch.Tensor:
        "Images (B,3,H,W) in [-1,1] -> the tower's normalised input at its size (differentiable)."
        x = images.to(self.device, torch.float32)
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode='bilinear', antialias=True, align_corners=False)
        return ((x + 1) / 2 - self.mean) / self.std

    def encode_image(self, images, # (B,3,H,W) tensor in [-1,1], or a list of PIL images
                     normalize:bool=True # L2-normalise the embeddings
                    )->torch.Tensor:
        "Embed images; differentiable w.r.t. tensor inputs."
        if isinstance(images, (list, tuple)): images = torch.stack([self.preprocess(i) for i in images])
        return self.model.encode_image(self.pixels(images), normalize=normalize)

    def encode_text(self, texts:str|Sequence[str], # one string or a list of strings
                    normalize:bool=True # L2-normalise the embeddings
                   )->torch.Tensor:
        "Embed texts."
        if isinstance(texts, str): texts = [texts]
        return self.model.encode_text(self.tokenizer(list(texts)).to(self.device), normalize=normalize)

    def forward(self, images, texts): return self.encode_image(images), self.encode_text(texts)


# %% [markdown]
# ## open_clip models by name and weights
#
# `load_open_clip(name, pretrained)` builds any open_clip architecture (built-in, or registered with
# `open_clip.add_model_config`) and loads its weights from a file path, or from a tag such as `'openai'` or
# `'laion2b_s34b_b79k'`. Nothing is downloaded: a tag is looked up in the local places weights can already be
# (a dermnb weights folder, the Hugging Face cache, open_clip's own cache), and when it is in none of them a
# `WeightsMissingError` says which file to fetch and how to point dermnb at it. `pretrained='random'` asks for random
# weights explicitly (tests, ablations), so an evaluation can never silently run on an untrained CLIP.
#
# A tag carries more than a file: its QuickGELU flag and its preprocessing (mean/std) travel with it, so a tag that
# resolves to a local file is loaded with both.

# %%
#| export
@contextlib.contextmanager
def _quiet_logs():
    "Silence open_clip's and transformers' info/warning logging and progress bars while loading."
    lg = logging.getLogger(); old = lg.level; lg.setLevel(logging.ERROR)
    try:
        import transformers; transformers.utils.logging.disable_progress_bar(); tl = transformers.utils.logging.get_verbosity()
        transformers.utils.logging.set_verbosity_error()
    except ImportError: tl = None
    try: yield
    finally:
        lg.setLevel(old)
        if tl is not None: transformers.utils.logging.set_verbosity(tl)


# %%
#| export
OPEN_CLIP_FILES = ('open_clip_model.safetensors', 'open_clip_pytorch_model.bin')


# %%
#| export
def weights_root()->Path|None:
    "Folder for pretrained weights dermnb cannot download: $DERMNB_WEIGHTS, else <data root>/weights."
    if os.environ.get('DERMNB_WEIGHTS'): return Path(os.environ['DERMNB_WEIGHTS']).expanduser()
    try: return data_root()/'weights'
    except DataError: return None


# %%
#| export
def _tag_candidates(name:str, tag:str, cache_dir:str|Path|None=None)->tuple[list[Path], str]:
    "Local paths where weights for (name, tag) may be, and a description of the remote source."
    cfg = open_clip.get_pretrained_cfg(name, tag)
    wr, cands, src = weights_root(), [], ''
    if wr is not None: cands += [wr/'open_clip'/name/tag/f for f in OPEN_CLIP_FILES + (f'{name}.pt',)]
    if cfg.get('hf_hub'):
        repo, fname = os.path.split(cfg['hf_hub'])   # 'org/repo/' -> default file names; 'org/repo/file' -> that file
        names = [fname] if fname else list(OPEN_CLIP_FILES)
        src = ' or '.join(f'https://huggingface.co/{repo}/resolve/main/{n}' for n in names)
        try:
            from huggingface_hub import try_to_load_from_cache
            for n in names:
                p = try_to_load_from_cache(repo, n, cache_dir=cache_dir)
                if isinstance(p, str): cands.append(Path(p))
        except ImportError: pass
    if cfg.get('url'):
        cands.append(Path(cache_dir or Path.home()/'.cache'/'clip')/os.path.basename(cfg['url']))
        src = src or cfg['url']
    return cands, src


# %%
#| export
def resolve_clip_weights(name:str, # open_clip architecture, e.g. 'ViT-B-32'
                         pretrained:str|Path, # weights file, or an open_clip tag such as 'openai'
                         cache_dir:str|Path|None=None # extra cache folder (open_clip / Hugging Face cache)
                        )->Path:
    "Find weights locally without downloading; raise `WeightsMissingError` saying what to fetch and where to put it."
    p = Path(str(pretrained)).expanduser()
    if p.is_file(): return p
    tags = open_clip.list_pretrained_tags_by_model(name)
    if str(pretrained) not in tags:
        raise WeightsMissingError(f"CLIP weights {p} not found, and {pretrained!r} is not an open_clip tag for {name} "
                                  f"(tags: {tags[:8]}{'...' if len(tags) > 8 else ''}). Pass a path to an existing .pt/.bin/.safetensors file.")
    cands, src = _tag_candidates(name, str(pretrained), cache_dir)
    for c in cands:
        if c.is_file(): return c
    wr = weights_root()
    dest = (wr/'open_clip'/name/str(pretrained)) if wr else Path('<weights folder>')/'open_clip'/name/str(pretrained)
    raise WeightsMissingError(
        f"open_clip weights {name}/{pretrained} are not available offline (looked in: {', '.join(map(str, cands)) or 'nowhere'}). "
        f"Download {src} on a machine with internet, then either put the file in {dest}/ "
        f"(set DERMNB_WEIGHTS to choose the weights folder) or pass its path: load_open_clip({name!r}, pretrained='/path/to/file').")


# %%
#| export
def load_open_clip(name:str='ViT-B-32', # open_clip architecture (built in, or registered with add_model_config)
                   pretrained:str|Path|None=None, # weights file or open_clip tag; 'random' for random weights
                   device:str|torch.device='cpu', # device for the model
                   cache_dir:str|Path|None=None # extra cache folder searched for tagged weights
                  )->ClipEncoder:
    "Load an open_clip model by name + weights (never downloading); returns a `ClipEncoder` in eval mode."
    if name not in open_clip.list_models():
        raise DermnbError(f"Unknown open_clip model {name!r}; register its config with open_clip.add_model_config "
                          f"or choose one of {open_clip.list_models()[:10]}...")
    if pretrained is None:
        raise WeightsMissingError(f"load_open_clip({name!r}) needs pretrained= a weights file or tag (or 'random' for random weights)")
    kw, tag_cfg = {}, {}
    if str(pretrained) == 'random': path = None
    else:
        path = resolve_clip_weights(name, pretrained, cache_dir)
        tag_cfg = open_clip.get_pretrained_cfg(name, str(pretrained)) if not Path(str(pretrained)).is_file() else {}
        if tag_cfg.get('quick_gelu'): kw['force_quick_gelu'] = True
        pp = {k: tag_cfg[k] for k in ('mean', 'std', 'interpolation', 'resize_mode') if k in tag_cfg}
        if pp: kw['force_preprocess_cfg'] = pp
    with warnings.catch_warnings(), _quiet_logs():
        warnings.simplefilter('ignore')
        model = open_clip.create_model(name, pretrained=str(path) if path else None, load_weights=path is not None,
                                       pretrained_image=False, pretrained_text=False, device=device, **kw)
    try: tok = open_clip.get_tokenizer(name)
    except OSError as e:
        raise WeightsMissingError(f"The tokenizer of {name} is not available offline ({e}); download it to the Hugging Face cache") from e
    pcfg = model.visual.preprocess_cfg
    size = pcfg['size'][0] if isinstance(pcfg['size'], (tuple, list)) else pcfg['size']
    fit = {'squash': 'squash', 'longest': 'pad'}.get(pcfg.get('resize_mode'), 'crop')
    enc = ClipEncoder(model, tok, size, pcfg['mean'], pcfg['std'], fit=fit, name=f'{name}/{Path(str(pretrained)).name}')
    return enc.to(device).eval()


# %% [markdown]
# The loader is tested on a real open_clip architecture, made tiny so it runs in a second: a ViT and text
# transformer of width 32, registered with `add_model_config`, saved to a temporary `.pt` and reloaded. The reloaded
# model must give the same embeddings; a missing file and an uncached tag must fail with messages that say what to do.

# %%
TINY = {'embed_dim': 32, 'vision_cfg': {'image_size': 32, 'layers': 1, 'width': 32, 'patch_size': 8, 'head_width': 16},
        'text_cfg': {'context_length': 32, 'vocab_size': 49408, 'width': 32, 'heads': 2, 'layers': 1}}
rec0 = get_split('isic2019', 'test', ROOT)[0]
with tempfile.TemporaryDirectory() as d:
    d = Path(d); (d/'dermnb-tiny-clip.json').write_text(json.dumps(TINY)); open_clip.add_model_config(d)
    torch.manual_seed(0); tiny = load_open_clip('dermnb-tiny-clip', 'random')
    torch.save(tiny.model.state_dict(), d/'tiny.pt')
    again = load_open_clip('dermnb-tiny-clip', d/'tiny.pt')
    img = again.preprocess(Image.open(rec0.image))[None]
    test_eq(img.shape, (1, 3, 32, 32)); assert -1 <= img.min() and img.max() <= 1
    with torch.no_grad():
        test_close(again.encode_image(img), tiny.encode_image(img), eps=1e-6)
        test_close(again.encode_text(['a nevus']), tiny.encode_text(['a nevus']), eps=1e-6)
        test_close(again.encode_image(img).norm(dim=-1), torch.ones(1), eps=1e-5)
    test_fail(lambda: load_open_clip('dermnb-tiny-clip', d/'absent.pt'), contains='absent.pt')
    os.environ['DERMNB_WEIGHTS'] = str(d)
    test_fail(lambda: load_open_clip('ViT-B-32', 'laion2b_s34b_b79k', cache_dir=d), contains='huggingface.co/laion/CLIP-ViT-B-32-laion2B-s34B-b79K')
    test_fail(lambda: load_open_clip('ViT-B-32', 'openai', cache_dir=d), contains=f'{d}/open_clip/ViT-B-32/openai')
    test_fail(lambda: load_open_clip('ViT-B-32'), contains="'random'")
    del os.environ['DERMNB_WEIGHTS']
assert issubclass(WeightsMissingError, FileNotFoundError)

# %% [markdown]
# ## Two CLIP losses for edits
#
# Both compare the *change* in an image with the *change* in a description, in CLIP space; they differ in purpose.
#
# - **S_dir** (`clip_direction_similarity`), as in InstructPix2Pix:
#   cos(E_I(edited) − E_I(original), E_T(target caption) − E_T(source caption)), with normalised embeddings and the
#   two captions as given. It is the **evaluation metric for edits** (how well an edit follows its instruction, next to
#   image similarity to the original).
# - **Directional CLIP loss** (`directional_clip_loss`), as in StyleGAN-NADA and DiffusionCLIP: the text direction is
#   averaged over prompt templates (mean normalised target embedding minus mean normalised source embedding), and the
#   loss is 1 − cos(image direction, text direction). It is differentiable with respect to the edited image, and it is
#   the **training loss of CPDE**, applied inside the lesion mask: with `mask`, the edited image is composited
#   onto the original outside the mask, so the image direction (and its gradient) only sees changes to the lesion.

# %%
#| export
EDIT_TEMPLATES = ('dermoscopy of {}', 'a dermoscopic image of {}', 'dermoscopy showing {}', 'a dermatoscope photo of {}',
                  'a close-up dermoscopy of {}', 'a skin lesion: {}')


# %%
#| export
def text_direction(clip:ClipEncoder, # the CLIP
                   source:str, # source description, e.g. 'a nevus'
                   target:str, # target description, e.g. 'a melanoma with a blue-whitish veil'
                   templates:Sequence[str]|None=EDIT_TEMPLATES # prompt templates with '{}'; None = use the texts as they are
                  )->torch.Tensor:
    "Unit text direction (D,): template-averaged normalised target embedding minus source embedding."
    def emb(t): return clip.encode_text([tp.format(t) for tp in templates] if templates else [t]).mean(0)
    with torch.no_grad(): return F.normalize(emb(target) - emb(source), dim=-1)


# %%
#| export
def clip_direction_similarity(clip:ClipEncoder, # the CLIP
                              original:torch.Tensor, # (B,3,H,W) in [-1,1], images before the edit
                              edited:torch.Tensor, # (B,3,H,W) in [-1,1], images after the edit
                              source_caption:str|Sequence[str], # caption(s) of the originals
                              target_caption:str|Sequence[str] # caption(s) the edits aim at
                             )->torch.Tensor:
    "InstructPix2Pix's S_dir per image: cos(E_I(edited) - E_I(original), E_T(target) - E_T(source))."
    n = len(original)
    src = [source_caption] * n if isinstance(source_caption, str) else list(source_caption)
    tgt = [target_caption] * n if isinstance(target_caption, str) else list(target_caption)
    di = clip.encode_image(edited) - clip.encode_image(original)
    dt = clip.encode_text(tgt) - clip.encode_text(src)
    return F.cosine_similarity(di, dt.to(di.device), dim=-1)


# %%
#| export
def directional_clip_loss(clip:ClipEncoder, # the CLIP (its weights are not updated)
                          original:torch.Tensor, # (B,3,H,W) in [-1,1], images before the edit
                          edited:torch.Tensor, # (B,3,H,W) in [-1,1], the edited images (gradients flow here)
                          source:str|None=None, # source description (with `target`), e.g. 'a nevus'
                          target:str|None=None, # target description, e.g. 'a melanoma'
                          text_dir:torch.Tensor|None=None, # precomputed `text_direction` (D,), or one per image (B, D)
                          mask:torch.Tensor|None=None, # (B,1,H,W) lesion mask in [0,1]; changes outside it are ignored
                          templates:Sequence[str]|None=EDIT_TEMPLATES # prompt templates for the text direction
                         )->torch.Tensor:
    "StyleGAN-NADA / DiffusionCLIP directional loss: mean of 1 - cos(E_I(edited) - E_I(original), text direction)."
    if text_dir is None:
        if source is None or target is None: raise DermnbError("directional_clip_loss needs source and target texts, or text_dir")
        text_dir = text_direction(clip, source, target, templates)
    if mask is not None: edited = original * (1 - mask) + edited * mask
    with torch.no_grad(): e0 = clip.encode_image(original)
    di = clip.encode_image(edited) - e0
    td = text_dir.to(di.device)
    return (1 - F.cosine_similarity(di, td[None] if td.ndim == 1 else td, dim=-1)).mean()


# %% [markdown]
# Checks on a constructed case with known geometry, then on real images.
#
# *Constructed:* a CLIP whose image tower is a linear map `W`, with images built as `W⁺ t` so that an image embeds
# exactly where a chosen text does. When the edit moves the image from the source text's embedding to the target's,
# the directions are identical: S_dir = 1 and the loss is 0; the reverse edit gives −1 and 2. S_dir is also checked
# against a cosine computed by hand with NumPy.

# %%
class _LinearCLIP(nn.Module):
    "A toy CLIP: image embedding = W @ pixels, text embedding looked up from a table."
    def __init__(self, W, table): super().__init__(); self.W, self.table = W, table
    def encode_image(self, x, normalize=False): f = x.flatten(1) @ self.W.T; return F.normalize(f, dim=-1) if normalize else f
    def encode_text(self, t, normalize=False): f = self.table[t]; return F.normalize(f, dim=-1) if normalize else f

g = torch.Generator().manual_seed(0); D, S = 8, 4
W, table = torch.randn(D, 3 * S * S, generator=g), F.normalize(torch.randn(2, D, generator=g), dim=-1)
toy = ClipEncoder(_LinearCLIP(W, table), lambda ts: torch.tensor([{'a nevus': 0, 'a melanoma': 1}[t] for t in ts]), S)
def _image_at(t):                       # an image in [-1,1] whose embedding is parallel to t
    px = torch.linalg.pinv(W) @ t * .05
    return ((px.view(1, 3, S, S) * toy.std + toy.mean) * 2 - 1)
src_img, tgt_img = _image_at(table[0]), _image_at(table[1])
test_close(toy.encode_image(src_img)[0], table[0], eps=1e-4)
test_close(clip_direction_similarity(toy, src_img, tgt_img, 'a nevus', 'a melanoma'), torch.ones(1), eps=1e-4)
test_close(directional_clip_loss(toy, src_img, tgt_img, 'a nevus', 'a melanoma', templates=None), 0., eps=1e-4)
test_close(directional_clip_loss(toy, tgt_img, src_img, 'a nevus', 'a melanoma', templates=None), 2., eps=1e-4)
# hand-checked cosine on real images with the tiny open_clip model from above (random weights: the algebra is the point)
tr4 = get_split('isic2018_task1', 'train', ROOT)[:4]
enc_small = tiny.eval()
imgs = torch.stack([enc_small.preprocess(Image.open(x.image)) for x in tr4])
edit = imgs.flip(3) * .8
s = clip_direction_similarity(enc_small, imgs, edit, 'dermoscopy of a nevus', 'dermoscopy of a melanoma')
with torch.no_grad():
    a = (enc_small.encode_image(edit) - enc_small.encode_image(imgs)).numpy()
    b = (enc_small.encode_text(['dermoscopy of a melanoma']) - enc_small.encode_text(['dermoscopy of a nevus'])).numpy()
test_close(s.detach().numpy(), (a @ b[0]) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b[0])), eps=1e-5)

# %% [markdown]
# *Real images:* the loss is differentiable with respect to the edited image and a few gradient steps on the pixels
# lower it; with a lesion mask, pixels outside the mask get no gradient at all, and the text direction can be
# precomputed once (CPDE does this per concept).

# %%
x0 = torch.stack([enc_small.preprocess(Image.open(x.image)) for x in tr4[:2]])
m = torch.stack([torch.from_numpy(np.asarray(fit_square(Image.open(x.mask), enc_small.image_size, enc_small.fit, is_mask=True)) > 0).float()[None] for x in tr4[:2]])
assert 0 < m.mean() < 1
tdir = text_direction(enc_small, 'a nevus', 'a melanoma with a blue-whitish veil')
test_close(tdir.norm(), 1., eps=1e-5)
xe = (x0 + .05 * torch.randn(x0.shape, generator=g)).requires_grad_(True)
l_first = directional_clip_loss(enc_small, x0, xe, text_dir=tdir, mask=m)
l_first.backward()
assert xe.grad.abs().sum() > 0 and (xe.grad * (1 - m)).abs().max() == 0      # gradient only inside the lesion
opt = torch.optim.Adam([xe], lr=.02)
for _ in range(10):
    opt.zero_grad(); l = directional_clip_loss(enc_small, x0, xe, text_dir=tdir, mask=m); l.backward(); opt.step()
print(f'directional loss {l_first.item():.3f} -> {l.item():.3f}')
assert l.item() < l_first.item() - .05
test_fail(lambda: directional_clip_loss(enc_small, x0, xe), contains='source and target')
per_image = directional_clip_loss(enc_small, x0, xe, text_dir=torch.stack([tdir, tdir]), mask=m)       # one direction per image
test_close(per_image, directional_clip_loss(enc_small, x0, xe, text_dir=tdir, mask=m), eps=1e-6)
