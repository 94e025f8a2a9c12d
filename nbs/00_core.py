# %% [markdown]
# # Core
#
# > Profiles, configs with stable hashes, seeding, devices, an atomic cache, image I/O and plotting helpers.

# %%
#| default_exp core

# %%
#| export
from __future__ import annotations
import os, json, hashlib, random, tempfile, shutil, contextlib, dataclasses, warnings
from dataclasses import dataclass, field, asdict
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence
import numpy as np
import torch
from PIL import Image, ImageFile, UnidentifiedImageError

# %%
from fastcore.test import test_eq, test_ne, test_fail, test_close


# %% [markdown]
# ## Errors
#
# Every error that a user can cause (bad data, absent weights, wrong options) is a `DermnbError`, so the CLI can
# print it as one clear line instead of a traceback. The subclasses also inherit the matching builtin, so callers
# that catch `ValueError` or `FileNotFoundError` keep working.

# %%
#| export
class DermnbError(Exception):
    "Base class for errors caused by inputs, data or missing weights (printed without traceback by the CLI)."


# %%
#| export
class DataError(DermnbError, ValueError):
    "A data file or folder is missing, corrupt, or laid out wrongly."


# %%
#| export
class WeightsMissingError(DermnbError, FileNotFoundError):
    "Pretrained weights are not available locally; the message says what to download."


# %% [markdown]
# Training loops (the diffusion trainer, the segmenter, DermCLIP) stop at the first non-finite loss with one error
# type, so a caller or the CLI can tell a diverged run from a crash.

# %%
#| export
class TrainingDivergedError(DermnbError, FloatingPointError):
    "A training loss became NaN or infinite."


# %%
assert issubclass(DataError, ValueError) and issubclass(WeightsMissingError, FileNotFoundError)
assert issubclass(TrainingDivergedError, DermnbError) and issubclass(TrainingDivergedError, FloatingPointError)
test_fail(lambda: (_ for _ in ()).throw(DataError('x.png: unreadable')), contains='x.png')


# %% [markdown]
# ## Profiles
#
# Two profiles run every method. `quick` runs on a 2-core CPU in minutes with small models trained in the project on
# the real data; `full` uses a GPU, paper settings and real pretrained models. A profile only carries the settings
# shared by all methods; each method's config reads what it needs from it. The device is not part of a profile: every
# entry point takes a `device` argument ('auto' picks CUDA when there is one).
#
# `train_minutes` is what one training run of a method is *sized* to on the reference machine (a 2-core CPU for
# `quick`). Quick models train for a fixed number of steps chosen to take about that long, so that a config always
# gives the same model; the time itself only caps a run as a safety net (a few times `train_minutes`), and the cap
# warns when it binds.

# %%
#| export
@dataclass(frozen=True)
class Profile:
    "Settings shared by every method for one run profile."
    name:str               # 'quick' or 'full'
    image_size:int         # side of the square training/eval images, pixels
    pretrained:bool        # use real pretrained hub models (full) or in-project models (quick)
    train_minutes:float    # minutes one training run is sized to on the reference machine (fixed steps; see above)
    n_eval:int             # images per evaluation set (0 = all)

PROFILES = {
    'quick': Profile('quick', image_size=64, pretrained=False, train_minutes=10, n_eval=200),
    'full':  Profile('full', image_size=512, pretrained=True, train_minutes=600, n_eval=0),
}


# %%
#| export
def get_profile(name:str|Profile='quick' # profile name or an existing Profile
               )->Profile:
    "Look up a run profile by name."
    if isinstance(name, Profile): return name
    if name not in PROFILES: raise DermnbError(f"Unknown profile {name!r}; choose one of {sorted(PROFILES)}")
    return PROFILES[name]


# %%
test_eq(get_profile('quick').image_size, 64)
assert get_profile('full').pretrained and not get_profile('quick').pretrained
test_fail(lambda: get_profile('medium'), contains='quick')


# %% [markdown]
# ## Configs with a stable hash
#
# Trained models are cached by config. The key must not change between Python sessions or machines, so it is a
# SHA-256 of the config's canonical JSON (sorted keys), not Python's salted `hash()`. Method configs subclass
# `Config` as plain dataclasses.

# %%
#| export
def _jsonable(o):
    if dataclasses.is_dataclass(o): return {k:_jsonable(v) for k,v in asdict(o).items()}
    if isinstance(o, dict): return {str(k):_jsonable(v) for k,v in o.items()}
    if isinstance(o, (list, tuple)): return [_jsonable(v) for v in o]
    if isinstance(o, Path): return str(o)
    if isinstance(o, (np.integer, np.floating)): return o.item()
    return o


# %%
#| export
def stable_hash(obj, # a dataclass, dict, list or scalar made of JSON-able parts
                n:int=12 # hex digits kept
               )->str:
    "SHA-256 of the canonical JSON of `obj`: identical across runs and machines."
    s = json.dumps(_jsonable(obj), sort_keys=True, separators=(',', ':'))
    return hashlib.sha256(s.encode()).hexdigest()[:n]


# %% [markdown]
# Some caches are keyed by data that has no config: generated images, a subset of pixels. `tensor_hash` keys them by
# content (shape, dtype and bytes), so the same pixels give the same key on every machine.

# %%
#| export
def tensor_hash(*tensors:torch.Tensor|np.ndarray|None, # tensors or arrays (None allowed)
                n:int=16 # hex digits kept
               )->str:
    "SHA-256 of the tensors' contents (and of their shapes and dtypes when there are several)."
    h = hashlib.sha256()
    for t in tensors:
        a = None if t is None else np.ascontiguousarray(t.detach().cpu().numpy() if torch.is_tensor(t) else t)
        if len(tensors) > 1: h.update(repr(None if a is None else (a.shape, str(a.dtype))).encode())
        if a is not None: h.update(a.tobytes())
    return h.hexdigest()[:n]


# %%
_a = torch.arange(6.).view(2, 3)
test_eq(tensor_hash(_a), hashlib.sha256(_a.numpy().tobytes()).hexdigest()[:16])     # one tensor: the hash of its bytes
test_eq(tensor_hash(_a, None), tensor_hash(_a.clone(), None)); test_ne(tensor_hash(_a, None), tensor_hash(_a.view(3, 2), None))
test_ne(tensor_hash(_a, _a), tensor_hash(_a, _a + 1)); test_eq(tensor_hash(_a.numpy()), tensor_hash(_a))


# %%
#| export
@dataclass(frozen=True)
class Config:
    "Base for method configs: a frozen dataclass with a stable hash and JSON round trip."
    late_fields = ()   # fields added after models were cached: in the key only when set away from their default
    def to_dict(self)->dict: return _jsonable(self)
    def hash(self)->str:
        d, dflt = self.to_dict(), {f.name: f.default for f in dataclasses.fields(self)}
        return stable_hash({'type': type(self).__name__, **{k: v for k, v in d.items() if not (k in self.late_fields and v == dflt[k])}})
    def replace(self, **kw): return dataclasses.replace(self, **kw)
    @classmethod
    def from_dict(cls, d:dict): return cls(**{f.name:d[f.name] for f in dataclasses.fields(cls) if f.name in d})


# %%
@dataclass(frozen=True)
class _Toy(Config):
    lr:float=1e-3
    size:int=64

a = _Toy()
test_eq(a.hash(), _Toy().hash())             # same config, same key
test_ne(a.hash(), a.replace(lr=2e-3).hash())  # any field changes the key
test_eq(_Toy.from_dict(a.to_dict()), a)
test_eq(stable_hash({'b':1,'a':2}), stable_hash({'a':2,'b':1}))  # key order does not matter

@dataclass(frozen=True)
class _Toy2(_Toy):                            # _Toy grown by one field after its models were cached
    late_fields = ('mode',)
    mode:str='a'
test_eq(_Toy2().hash(), stable_hash({'type': '_Toy2', 'lr': 1e-3, 'size': 64}))   # at its default: the old key
test_ne(_Toy2(mode='b').hash(), _Toy2().hash())                                    # set: a new key


# %% [markdown]
# ## Seeding and devices
#
# `seed_everything` seeds Python, NumPy and torch at once; `make_generator` gives a `torch.Generator` for the
# diffusers-style `generator=` arguments, so sampling is reproducible without touching global state.

# %%
#| export
def seed_everything(seed:int=0, # the seed for python, numpy and torch
                    deterministic:bool=False # also ask torch for deterministic kernels
                   )->int:
    "Seed every random number generator that dermnb uses."
    random.seed(seed); np.random.seed(seed % 2**32); torch.manual_seed(seed)
    if deterministic: torch.use_deterministic_algorithms(True, warn_only=True)
    return seed


# %%
#| export
def get_device(pref:str|torch.device='auto' # 'auto', 'cpu', 'cuda' or 'cuda:N'
              )->torch.device:
    "Resolve a device preference; 'auto' picks CUDA when available."
    if isinstance(pref, torch.device): return pref
    if pref in (None, 'auto'): return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    if str(pref).startswith('cuda') and not torch.cuda.is_available():
        raise DermnbError(f"Device {pref!r} requested but CUDA is not available; use --device cpu or auto")
    return torch.device(pref)


# %%
#| export
def make_generator(seed:int, # seed for this generator
                   device:str|torch.device='cpu' # device the generator draws on
                  )->torch.Generator:
    "A seeded `torch.Generator`, for reproducible sampling without global state."
    return torch.Generator(device=torch.device(device)).manual_seed(seed)


# %%
seed_everything(3); x1 = torch.rand(3)
seed_everything(3); x2 = torch.rand(3)
test_eq(x1, x2)
test_eq(torch.rand(2, generator=make_generator(5)), torch.rand(2, generator=make_generator(5)))
test_eq(get_device('cpu').type, 'cpu')
if not torch.cuda.is_available(): test_fail(lambda: get_device('cuda'), contains='CUDA is not available')


# %% [markdown]
# ## Measured numbers in prose
#
# Prose that cites a measurement must not type the number in: it goes stale the moment the code changes. Benchmarks
# (`benchmarks/*.py`) write their results to `benchmarks/results/<name>.csv`, figure notebooks to
# `figures/<name>/*.csv`, and both are committed. A notebook that discusses a number reads it with `results_csv` and
# prints it, so the text and the number cannot disagree. `project_root` finds the checkout those files live in.

# %%
#| export
def project_root()->Path:
    "The repository root (the folder holding settings.ini and nbs/), for an editable install or a checkout."
    here = [Path(__file__).resolve().parents[1]] if '__file__' in globals() else []   # the package's checkout
    for p in [Path.cwd(), *Path.cwd().parents, *here]:
        if (p/'settings.ini').exists() and (p/'nbs').is_dir(): return p
    raise DermnbError("Cannot find the dermnb project (settings.ini + nbs/); run from the repository")


# %%
#| export
def results_csv(path:str|Path # a results file relative to the project root, e.g. 'benchmarks/results/cpu_layout.csv'
               )->'pd.DataFrame':
    "A committed benchmark or figure CSV as a DataFrame; a missing file is a `DataError` saying what produces it."
    import pandas as pd
    p = project_root()/path
    if not p.is_file():
        what = f"python benchmarks/{Path(path).stem}.py" if Path(path).parts[:1] == ('benchmarks',) else f"make figures FIGS={Path(path).parts[1] if len(Path(path).parts) > 2 else '?'}"
        raise DataError(f"{p}: no measurement yet; run `{what}` to produce it")
    return pd.read_csv(p)


# %%
test_eq((project_root()/'settings.ini').exists(), True)
test_fail(lambda: results_csv('benchmarks/results/never_run.csv'), contains='python benchmarks/never_run.py')
test_eq(results_csv('figures/diffseg/comparison.csv').columns[0], 'dataset')


# %% [markdown]
# ## Denormal floats on the CPU
#
# Numbers below float32's smallest normal value (about 1.2e-38) are *denormal*, and x86 CPUs compute with them up to
# a hundred times slower. Real data produces them inside a diffusion UNet: with real caption embeddings, cross-attention
# softmaxes are peaked and their smallest probabilities underflow into denormals. `benchmarks/denormals.py` times a
# training step (forward and backward) of the quick base model's UNet on real caption embeddings with and without
# the flag (its table is printed below the function). Flushing denormals to zero changes results only below 1e-38.
#
# The flag is per thread, and a new thread inherits the flag of the thread that creates it, so it must be set before
# torch starts its CPU worker threads. dermnb therefore sets it when `dermnb.core` is first imported (every dermnb
# module imports it). To keep denormals, set `DERMNB_KEEP_DENORMALS=1` before importing dermnb.

# %%
#| export
def flush_denormals(on:bool=True # flush denormal floats to zero on this thread and the CPU threads it starts later
                   )->bool:
    "Turn CPU flush-to-zero for denormal floats on or off; returns whether it is on."
    return bool(torch.set_flush_denormal(on)) and on

if not os.environ.get('DERMNB_KEEP_DENORMALS'): flush_denormals()

# %%
tiny = lambda: (torch.tensor([1e-20]) * torch.tensor([1e-20])).item()      # 1e-40 is denormal in float32
if flush_denormals():                                                      # x86 with SSE3, as on every dev and CI machine
    test_eq(tiny(), 0.)
    flush_denormals(False); assert 0 < tiny() < 1e-38; flush_denormals()  # off: the denormal survives
    import subprocess, sys
    code = "import dermnb.core, torch; print((torch.tensor([1e-20]) * torch.tensor([1e-20])).item())"
    run = lambda env: float(subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                                           env={**os.environ, **env}).stdout)
    test_eq(run({}), 0.); assert run({'DERMNB_KEEP_DENORMALS': '1'}) > 0   # set at import, unless opted out

# %%
results_csv('benchmarks/results/denormals.csv')     # measured by benchmarks/denormals.py

# %% [markdown]
# The second CPU lever is memory layout. oneDNN, PyTorch's CPU convolution library, is fastest on channels-last
# (NHWC) tensors, and a convolution given a channels-last input runs in that layout even when its weights are not.
# Batch size matters as much: activations that outgrow the CPU cache make large batches *slower* per image. dermnb's
# CPU inference loops (TAEF2 encoding and decoding, DermCLIP's frozen stem, the FID Inception, pixel-space sampling)
# therefore run batches of `CPU_BATCH` images, channels-last where it helps. `benchmarks/cpu_layout.py` measures both
# levers against NCHW batches of 64 (ms per image and the speed-ups; its last run is printed under the test below).
# Values agree up to float rounding.

# %%
#| export
CPU_BATCH = 16   # images per convolutional inference batch on a CPU: larger batches outgrow the cache


# %%
#| export
def channels_last(x:torch.Tensor # an image batch (B, C, H, W)
                 )->torch.Tensor:
    "`x` in channels-last memory, the layout oneDNN's CPU convolutions are fastest on (same values and shape)."
    return x.contiguous(memory_format=torch.channels_last) if x.ndim == 4 else x


# %%
xb = torch.randn(2, 3, 5, 4)
test_eq(channels_last(xb), xb); assert channels_last(xb).is_contiguous(memory_format=torch.channels_last)
conv = torch.nn.Conv2d(3, 8, 3)
test_close(conv(channels_last(xb)), conv(xb), eps=1e-5)                   # same result, different layout
test_eq(channels_last(torch.ones(3)).shape, (3,))                         # non-image tensors pass through

# %%
results_csv('benchmarks/results/cpu_layout.csv')    # measured by benchmarks/cpu_layout.py


# %% [markdown]
# ## Atomic writes
#
# A crash half-way through writing must never leave a truncated checkpoint, mask or CSV that looks valid.
# `atomic_write` writes to a temporary file in the destination folder and renames it into place
# (`os.replace` is atomic on POSIX); on error the temporary file is removed and the old file survives.

# %%
#| export
@contextlib.contextmanager
def atomic_write(path:str|Path, # final file path
                 mode:str='wb' # 'wb' or 'w'
                ):
    "Context manager yielding a file handle whose content replaces `path` only on success."
    path = Path(path); path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.', suffix='.tmp')
    umask = os.umask(0); os.umask(umask); os.chmod(tmp, 0o666 & ~umask)   # mkstemp's 0600 would stick after the rename
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush(); os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError): os.remove(tmp)
        raise


# %% [markdown]
# `atomic_save` does the same for savers that want a path rather than a handle: the temporary path keeps the suffix,
# so format detection by suffix (PIL, pandas) still works.

# %%
#| export
def atomic_save(path:str|Path, # final file path; the suffix tells savers like PIL the format
                save_fn:Callable[[Path], Any] # writes the content to the temporary path it is given
               )->Path:
    "Run a library saver (`torch.save`, `df.to_csv`, `img.save`...) on a temp path, then rename it into place."
    path = Path(path); path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f'.{path.stem}.{os.getpid()}.tmp{path.suffix}')
    try: save_fn(tmp); os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError): os.remove(tmp)
        raise
    return path


# %%
#| export
def save_json(obj, # JSON-able object (dataclasses allowed)
              path:str|Path # destination
             )->Path:
    "Write JSON atomically."
    with atomic_write(path, 'w') as f: json.dump(_jsonable(obj), f, indent=2, sort_keys=True)
    return Path(path)


# %%
with tempfile.TemporaryDirectory() as d:
    p = Path(d)/'a.txt'
    with atomic_write(p, 'w') as f: f.write('good')
    def _boom():
        with atomic_write(p, 'w') as f: f.write('half'); raise RuntimeError('crash')
    test_fail(_boom, contains='crash')
    test_eq(p.read_text(), 'good')                  # the old content survived the crash
    test_eq(oct(p.stat().st_mode & 0o044), oct(0o044))   # readable like any other file
    test_eq(sorted(x.name for x in Path(d).iterdir()), ['a.txt'])  # no temp files left
    save_json({'x': Path('y')}, Path(d)/'b.json'); test_eq(json.loads((Path(d)/'b.json').read_text()), {'x':'y'})
    atomic_save(Path(d)/'t.pt', lambda t: torch.save({'w':1}, t)); test_eq(torch.load(Path(d)/'t.pt')['w'], 1)


# %% [markdown]
# ## The cache
#
# Trained models and reference features live in a cache directory outside the repository:
# `$DERMNB_CACHE`, else `~/.cache/dermnb`. An entry is a folder `<kind>/<config hash>/`. `cached_dir` builds it
# in a temporary sibling folder and renames it into place when the build function returns, so a crash mid-training
# never leaves an entry that later runs would trust. The config is saved next to the artefacts.

# %%
#| export
def cache_root(root:str|Path|None=None # explicit cache root; default $DERMNB_CACHE or ~/.cache/dermnb
              )->Path:
    "The cache root folder (created if needed)."
    root = Path(root or os.environ.get('DERMNB_CACHE') or Path.home()/'.cache'/'dermnb').expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


# %%
#| export
def cached_dir(kind:str, # cache family, e.g. 'base-model' or 'fid-features'
               cfg, # config (Config, dataclass or dict) whose stable hash keys the entry
               build:Callable[[Path], Any], # fills the folder it is given; called only on a cache miss
               root:str|Path|None=None, # cache root override
               refresh:bool=False # rebuild even when the entry exists
              )->Path:
    "Return the cache folder for `(kind, cfg)`, building it atomically on a miss."
    key = cfg.hash() if isinstance(cfg, Config) else stable_hash(cfg)
    final = cache_root(root)/kind/key
    if final.exists() and not refresh: return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f'.{key}.'))
    try:
        build(tmp)
        save_json({'kind': kind, 'config': cfg}, tmp/'config.json')
        if final.exists(): shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True); raise
    return final


# %%
with tempfile.TemporaryDirectory() as d:
    calls = []
    def build(p): calls.append(1); (p/'w.txt').write_text('w')
    p1 = cached_dir('toy', _Toy(), build, root=d)
    p2 = cached_dir('toy', _Toy(), build, root=d)
    test_eq(p1, p2); test_eq(len(calls), 1)         # second call is a cache hit
    assert (p1/'config.json').exists()
    test_fail(lambda: cached_dir('toy', _Toy(lr=9.), lambda p: 1/0, root=d))
    assert not (Path(d)/'toy'/_Toy(lr=9.).hash()).exists()    # a failed build leaves no entry
    test_eq([x for x in (Path(d)/'toy').iterdir() if x.name.startswith('.')], [])


# %% [markdown]
# ## Data root
#
# Code never hard-codes where datasets live: it reads `DERMNB_DATA` (CI sets it to `../shared/dermdata`), or an
# explicit `--root`.

# %%
#| export
def data_root(root:str|Path|None=None # explicit root; default $DERMNB_DATA
             )->Path:
    "Resolve the dataset root folder, with a clear error when it is not set or missing."
    root = root or os.environ.get('DERMNB_DATA')
    if not root: raise DataError("No data root: set DERMNB_DATA (e.g. export DERMNB_DATA=../shared/dermdata) or pass --root")
    root = Path(root).expanduser()
    if not root.is_dir(): raise DataError(f"Data root {root} does not exist or is not a folder")
    return root


# %%
test_fail(lambda: data_root('/nonexistent/dermdata'), contains='/nonexistent/dermdata')


# %% [markdown]
# ## Image I/O
#
# All readers go through `load_image` / `load_mask`, which turn every way a file can be bad into a `DataError`
# naming the file. Images come back as RGB (RGBA is composited on white, grayscale and palette images are
# converted).

# %%
#| export
def load_image(path:str|Path, # image file (jpg, png, bmp...)
               mode:str='RGB' # PIL mode to convert to
              )->Image.Image:
    "Read an image fully, converting RGBA/grayscale/palette to `mode`; corrupt files raise `DataError`."
    path = Path(path)
    if not path.is_file(): raise DataError(f"{path}: image file not found")
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ('RGBA', 'LA', 'P') and mode == 'RGB':
                im = im.convert('RGBA'); bg = Image.new('RGBA', im.size, (255,255,255,255))
                im = Image.alpha_composite(bg, im)
            return im.convert(mode)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{path}: unreadable or truncated image ({type(e).__name__}: {e})") from e


# %%
with tempfile.TemporaryDirectory() as d:
    d = Path(d)
    Image.new('RGBA', (8, 6), (255, 0, 0, 0)).save(d/'rgba.png')
    test_eq(load_image(d/'rgba.png').getpixel((0, 0)), (255, 255, 255))   # transparent -> white background
    Image.new('L', (8, 6), 90).save(d/'gray.png'); test_eq(load_image(d/'gray.png').mode, 'RGB')
    (d/'bad.jpg').write_bytes(b'not a jpeg'); test_fail(lambda: load_image(d/'bad.jpg'), contains='bad.jpg')
    test_fail(lambda: load_image(d/'absent.png'), contains='absent.png: image file not found')


# %% [markdown]
# Masks come back as boolean arrays and must be binary: any value other than the two extremes means the file is not a
# mask (for example a JPEG-compressed or soft mask), and `binarize=True` thresholds at half range instead. A mask of
# the wrong size for its image is an error naming the file and both sizes.

# %%
#| export
def load_mask(path:str|Path, # mask file; lesion pixels at the top of the range (255 or 1)
              size:tuple|None=None, # expected (width, height), e.g. of the matching image
              binarize:bool=False # threshold non-binary masks at half range instead of raising
             )->np.ndarray:
    "Read a binary lesion mask as a bool array (H, W), checking size and binarity."
    im = load_image(path, 'L'); a = np.asarray(im)
    if size is not None and (a.shape[1], a.shape[0]) != tuple(size):
        raise DataError(f"{path}: mask size {a.shape[1]}x{a.shape[0]} differs from its image {size[0]}x{size[1]}")
    if binarize: return a >= 128
    vals = [v for v, n in enumerate(im.histogram()) if n]      # the grey levels present (much faster than np.unique)
    if not set(vals) <= {0, 1, 255} or {1, 255} <= set(vals):
        raise DataError(f"{path}: mask is not binary (values {vals[:6]}{'...' if len(vals)>6 else ''}); "
                        "pass binarize=True / --binarize to threshold it")
    return a > 0


# %%
with tempfile.TemporaryDirectory() as d:
    d = Path(d)
    m = np.zeros((6, 8), np.uint8); m[2:4, 2:5] = 255; Image.fromarray(m).save(d/'m.png')
    test_eq(load_mask(d/'m.png').sum(), 6)
    test_fail(lambda: load_mask(d/'m.png', size=(9, 6)), contains='differs')
    m[0, 0] = 128; Image.fromarray(m).save(d/'soft.png')
    test_fail(lambda: load_mask(d/'soft.png'), contains='not binary')
    test_eq(load_mask(d/'soft.png', binarize=True).sum(), 7)


# %% [markdown]
# ## Images as tensors
#
# dermnb's models see images as float tensors in **[-1, 1]**, (3, H, W): the range of the diffusion backbone, the
# data layer, the segmenter and CLIP inputs. `image_to_tensor` and `tensor_to_image` are the one way between PIL
# and that range, everywhere in the project.

# %%
#| export
def image_to_tensor(img:Image.Image # a PIL image (any mode; converted to RGB)
                   )->torch.Tensor:
    "A PIL image as a float tensor (3, H, W) in [-1, 1]."
    a = np.asarray(img.convert('RGB'), dtype=np.float32)
    return torch.from_numpy(a.copy()).permute(2, 0, 1) / 127.5 - 1


# %%
#| export
def tensor_to_image(x:torch.Tensor # an image tensor (3, H, W) or (1, H, W) in [-1, 1]
                   )->Image.Image:
    "A [-1, 1] image tensor as a PIL image (RGB, or L for one channel), rounded to uint8."
    x = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    a = x.permute(1, 2, 0).numpy()
    return Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a)


# %%
im = Image.fromarray(np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3) * 4)
t = image_to_tensor(im)
test_eq(t.shape, (3, 4, 5)); assert t.min() >= -1 and t.max() <= 1 and t.dtype == torch.float32
test_eq(np.asarray(tensor_to_image(t)), np.asarray(im))                 # exact round trip of uint8 pixels
test_eq(image_to_tensor(Image.new('L', (3, 2), 255)).shape, (3, 2, 3))  # grey images become RGB
test_eq(tensor_to_image(torch.zeros(1, 2, 3)).mode, 'L')


# %% [markdown]
# `to_pil` accepts whatever a caller has (PIL, a uint8/bool/float array, a tensor in [-1, 1] or [0, 1]) and
# `save_image` writes it atomically. Tensors in [-1, 1] go through `tensor_to_image`.

# %%
#| export
def to_pil(x # PIL image, HxW(x3) uint8/bool/float array in [0,1], or CHW tensor in [-1,1] or [0,1]
          )->Image.Image:
    "Convert a PIL image, numpy array or tensor (CHW, [-1,1] or [0,1]) to a PIL image."
    if isinstance(x, Image.Image): return x
    if isinstance(x, torch.Tensor):
        x = x.detach().float().cpu()
        if x.ndim == 3 and x.min() < 0: return tensor_to_image(x)
        if x.ndim == 3: x = x.permute(1, 2, 0)
        x = x.clamp(0, 1).numpy()
        if x.shape[-1] == 1: x = x[..., 0]
    x = np.asarray(x)
    if x.dtype == bool: x = x.astype(np.uint8) * 255
    elif x.dtype != np.uint8: x = (np.clip(x, 0, 1) * 255).round().astype(np.uint8)
    return Image.fromarray(x)


# %%
#| export
def save_image(img, # PIL image, HxW(x3) uint8/bool/float array in [0,1], or CHW tensor in [-1,1] or [0,1]
               path:str|Path # destination; format from the suffix
              )->Path:
    "Write an image atomically."
    return atomic_save(path, lambda t: to_pil(img).save(t, format=Image.registered_extensions()[Path(path).suffix.lower()]))


# %%
with tempfile.TemporaryDirectory() as d:
    d = Path(d)
    save_image(torch.zeros(3, 4, 5) - 1, d/'t.png'); test_eq(np.asarray(load_image(d/'t.png')).max(), 0)
    save_image(np.eye(4, dtype=bool), d/'m.png'); test_eq(load_mask(d/'m.png').sum(), 4)
    test_eq(np.asarray(to_pil(torch.ones(3, 2, 2))).min(), 255)          # [0, 1] tensors too

# %% [markdown]
# ## Listing image files
#
# One way to list the images of a folder, for every command that reads one (`dermnb eval fid`, `dermnb segment`,
# generated-image folders): the files PIL reads, sorted, not recursive, hidden files skipped. Masks written next to
# images (`<stem>_segmentation.png`, as the ISIC naming and SkinDualGen's image/mask pairs have it; `_ambiguity` maps)
# are not images to process, so they are skipped unless `masks=True`.

# %%
#| export
IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff', '.webp')
MASK_STEM_SUFFIXES = ('_segmentation', '_ambiguity')

def image_files(folder:str|Path, # folder of images
                masks:bool=False # also list mask files (stems ending in `MASK_STEM_SUFFIXES`)
               )->list:
    "Sorted image files (png, jpg, bmp, tif, webp) directly inside `folder`; a missing or empty folder is a `DataError`."
    folder = Path(folder)
    if not folder.is_dir(): raise DataError(f"{folder}: image folder not found")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith('.')
                   and (masks or not p.stem.endswith(MASK_STEM_SUFFIXES)))
    if not files: raise DataError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


# %%
with tempfile.TemporaryDirectory() as d:
    d = Path(d)
    for n in ('b.jpg', 'a.png', 'a_segmentation.png', '.hidden.png', 'notes.txt'): (d/n).write_bytes(b'')
    test_eq([p.name for p in image_files(d)], ['a.png', 'b.jpg'])
    test_eq([p.name for p in image_files(d, masks=True)], ['a.png', 'a_segmentation.png', 'b.jpg'])
    test_fail(lambda: image_files(d/'none'), contains='image folder not found')
    (d/'empty').mkdir(); test_fail(lambda: image_files(d/'empty'), contains='no images')

# %% [markdown]
# ## Plotting
#
# Figures are for looking at: mask contours go on the image, **ground truth in green and prediction in red**
# (as in CPDE's figures), and grids carry readable titles. `save_figure` writes PNGs atomically.

# %%
#| export
import matplotlib
import matplotlib.pyplot as plt

GT_COLOR, PRED_COLOR = '#00d000', '#ff2020'

def overlay_contours(image, # PIL image, array or tensor
                     gt:np.ndarray|None=None, # ground-truth mask (H, W), drawn green
                     pred:np.ndarray|None=None, # predicted mask (H, W), drawn red
                     ax=None, # matplotlib axes; a new figure when None
                     title:str|None=None, # axes title
                     lw:float=1.5 # contour line width
                    ):
    "Show an image with the ground-truth contour in green and the predicted one in red."
    if ax is None: _, ax = plt.subplots(figsize=(3, 3))
    ax.imshow(to_pil(image)); ax.set_axis_off()
    for m, c in ((gt, GT_COLOR), (pred, PRED_COLOR)):
        if m is not None and np.asarray(m).any():
            ax.contour(np.asarray(m).astype(float), levels=[0.5], colors=[c], linewidths=lw)
    if title: ax.set_title(title, fontsize=8)
    return ax


# %%
m = np.zeros((32, 32), bool); m[8:24, 8:24] = True
ax = overlay_contours(np.full((32, 32, 3), .5), m, np.roll(m, 3, 0), title='a')
test_eq(ax.get_title(), 'a'); test_eq(len(ax.collections), 2)   # one contour set for the ground truth, one for the prediction
plt.close('all')


# %% [markdown]
# A grid of images shares one layout for every figure notebook: a title per panel, optional contours, and a figure
# title that constrained layout keeps clear of the panel titles.

# %%
#| export
def image_grid(images:Sequence, # images (PIL, arrays or tensors)
               titles:Sequence[str]|None=None, # one title per image
               ncols:int=6, # columns
               masks:Sequence|None=None, # optional ground-truth masks, drawn as green contours
               preds:Sequence|None=None, # optional predicted masks, drawn as red contours
               size:float=2.0, # inches per cell
               suptitle:str|None=None # figure title
              ):
    "A titled grid of images, optionally with mask contours; returns the figure."
    n = len(images); ncols = min(ncols, n); nrows = max(1, -(-n // ncols))
    # constrained layout leaves room for the suptitle and the panel titles (tight_layout lets them overlap)
    fig, axs = plt.subplots(nrows, ncols, figsize=(size*ncols, size*nrows + (.4 if suptitle else 0)), squeeze=False, layout='constrained')
    for i, ax in enumerate(axs.flat):
        if i >= n: ax.set_axis_off(); continue
        overlay_contours(images[i], masks[i] if masks is not None else None, preds[i] if preds is not None else None,
                         ax=ax, title=titles[i] if titles is not None else None)
    if suptitle: fig.suptitle(suptitle)
    return fig


# %%
#| export
def save_figure(fig, # matplotlib figure
                path:str|Path, # PNG destination
                dpi:int=120 # resolution
               )->Path:
    "Save a figure atomically and close it."
    p = atomic_save(path, lambda t: fig.savefig(t, dpi=dpi, bbox_inches='tight', format='png'))
    plt.close(fig)
    return p


# %%
fig = image_grid([np.full((32, 32, 3), .5)]*3, titles=['a', 'b', 'c'], masks=[m]*3, preds=[np.roll(m, 3, 0)]*3, suptitle='grid')
test_eq([a.get_title() for a in fig.axes], ['a', 'b', 'c']); test_eq(fig._suptitle.get_text(), 'grid')
with tempfile.TemporaryDirectory() as d: assert save_figure(fig, Path(d)/'g.png').stat().st_size > 1000
