# %% [markdown]
# # Data
#
# > Loaders for the official layouts of ISIC 2017/2018/2019, PH2, Derm7pt and ENHANCE, one record type across them,
# > leak-free splits, and torch datasets with paired image+mask augmentation.

# %%
#| default_exp data

# %%
#| export
from __future__ import annotations
import os, re, csv, json, shutil, warnings, tempfile
from dataclasses import dataclass, field, asdict
from collections import Counter
from pathlib import Path
from typing import Callable, Iterable, Sequence
import numpy as np
import pandas as pd
import torch
from PIL import Image
from dermnb.core import (DataError, data_root, load_image, load_mask, stable_hash, cache_root, atomic_save)

# %%
from fastcore.test import test_eq, test_ne, test_fail, test_close
import matplotlib; matplotlib.use('Agg')
ROOT = data_root()   # $DERMNB_DATA; CI sets ../shared/dermdata

# %% [markdown]
# ## One record type
#
# Every dataset becomes a list of `Record`s, so methods never care where an image came from. `diagnosis` is mapped
# to one shared vocabulary (`LABELS`) while `diagnosis_orig` keeps the dataset's own wording. `concepts` holds expert or
# crowd annotations (PH2 dermoscopic structures, Derm7pt 7-point criteria, ENHANCE A/B/C scores), `meta` the
# patient metadata (age, sex, site, lesion_id).

# %%
#| export
LABELS = ['melanoma', 'nevus', 'basal_cell_carcinoma', 'actinic_keratosis', 'benign_keratosis',
          'dermatofibroma', 'vascular_lesion', 'squamous_cell_carcinoma', 'other']

@dataclass
class Record:
    "One dermoscopic image with its optional mask, labels, concepts and metadata."
    id:str                    # image id, e.g. 'ISIC_0000000' or 'IMD003'
    source:str                # dataset key, e.g. 'isic2018_task1'
    image:Path                # image file
    mask:Path|None=None       # binary lesion mask file, if the dataset has one
    diagnosis:str|None=None   # label in the shared vocabulary `LABELS`
    diagnosis_orig:str|None=None # the dataset's own label
    concepts:dict=field(default_factory=dict) # expert/crowd annotations
    meta:dict=field(default_factory=dict)     # age, sex, site, lesion_id

    @property
    def label(self)->int:
        "Index of `diagnosis` in `LABELS`, or -1 when unknown."
        return LABELS.index(self.diagnosis) if self.diagnosis in LABELS else -1


# %%
r = Record('ISIC_0000000', 'isic2018_task1', Path('x.jpg'), diagnosis='nevus')
test_eq(r.label, 1); test_eq(Record('a', 'b', Path('c')).label, -1)

# %% [markdown]
# ## Expected layouts, and errors that show them
#
# The loaders read the official releases as they are unpacked. When the root or a folder inside it is missing, the
# error prints the layout that was expected, so a user with a differently named download sees at once what to move.

# %%
#| export
LAYOUTS = {
    'isic2018_task1': ['isic2018_task1/ISIC2018_Task1-2_Training_Input/ISIC_xxxxxxx.jpg',
                       'isic2018_task1/ISIC2018_Task1_Training_GroundTruth/ISIC_xxxxxxx_segmentation.png'],
    'isic2017': ['isic2017/ISIC-2017_Training_Part3_GroundTruth.csv  (image_id, melanoma, seborrheic_keratosis)',
                 'isic2017/ISIC-2017_Training_Data_metadata.csv  (image_id, age_approximate, sex)'],
    'isic2019': ['isic2019/ISIC_2019_Training_Input/ISIC_xxxxxxx.jpg',
                 'isic2019/ISIC_2019_Training_GroundTruth.csv  (image, MEL, NV, BCC, AK, BKL, DF, VASC, SCC, UNK)',
                 'isic2019/ISIC_2019_Training_Metadata.csv  (image, age_approx, anatom_site_general, lesion_id, sex)'],
    'ph2': ['ph2/PH2Dataset/PH2 Dataset images/IMDxxx/IMDxxx_Dermoscopic_Image/IMDxxx.bmp',
            'ph2/PH2Dataset/PH2 Dataset images/IMDxxx/IMDxxx_lesion/IMDxxx_lesion.bmp',
            'ph2/PH2Dataset/PH2_dataset.xlsx'],
    'derm7pt': ['derm7pt/meta/meta.csv  (diagnosis, 7-point criteria, derm = image path under images/)',
                'derm7pt/images/<dir>/<name>.jpg'],
    'enhance': ['enhance/crowd/{asymmetry,border,color}.csv  (ID, i, ii, iii)',
                'enhance/crowd/{asymmetry,border,color}_ph2.csv'],
}
DATASETS = list(LAYOUTS)

def _need(path:Path, dataset:str)->Path:
    "Return `path` if it exists, else raise a DataError that shows the dataset's expected layout."
    if not path.exists():
        lay = '\n  '.join(LAYOUTS[dataset])
        raise DataError(f"{dataset}: {path} not found. Expected layout under the data root:\n  {lay}")
    return path


# %%
test_fail(lambda: _need(Path('/nope/isic2017/x.csv'), 'isic2017'), contains='ISIC-2017_Training_Part3_GroundTruth.csv')


# %% [markdown]
# ## Lenient and strict loading
#
# Real downloads have flaws: Derm7pt's consistent release lists one image that is not there; a user's copy may hold a
# truncated JPEG. A `Records` list carries what was skipped and why, so problems are counted instead of lost.
# In strict mode the first problem raises a `DataError` naming the file; in lenient mode (the default) the item is
# skipped, counted in `.skipped`, and one warning sums them up.

# %%
#| export
class Records(list):
    "A list of `Record`s that remembers what was skipped while loading, and why."
    def __init__(self, items=(), skipped=None):
        super().__init__(items); self.skipped = list(skipped or [])

class _Problems:
    "Collect loading problems: raise at once in strict mode, else skip and warn once at the end."
    def __init__(self, dataset, strict): self.dataset, self.strict, self.items = dataset, strict, []
    def __call__(self, path, why):
        msg = f"{path}: {why}"
        if self.strict: raise DataError(f"{self.dataset}: {msg}")
        self.items.append((str(path), why))
    def done(self, records)->Records:
        if self.items:
            ex = '; '.join(f"{p}: {w}" for p, w in self.items[:3])
            warnings.warn(f"{self.dataset}: skipped {len(self.items)} item(s) (e.g. {ex}); pass strict=True to raise")
        return Records(records, self.items)


# %% [markdown]
# ## ISIC 2017 and ISIC 2019 labels
#
# ISIC 2017 Part 3 labels an image melanoma, seborrheic keratosis, or neither (= nevus); ISIC 2019 gives a one-hot
# row over nine classes. Both map onto `LABELS`. Seborrheic keratosis falls under ISIC 2019's BKL (benign keratosis).

# %%
#| export
ISIC2019_MAP = {'MEL': 'melanoma', 'NV': 'nevus', 'BCC': 'basal_cell_carcinoma', 'AK': 'actinic_keratosis',
                'BKL': 'benign_keratosis', 'DF': 'dermatofibroma', 'VASC': 'vascular_lesion',
                'SCC': 'squamous_cell_carcinoma', 'UNK': 'other'}

def _age(v):
    try: return None if pd.isna(v) or v == '' else float(v)
    except (TypeError, ValueError): return None

def _str(v): return None if v is None or (isinstance(v, float) and np.isnan(v)) or v == '' else str(v)

def load_isic2017(root:str|Path|None=None # data root; default $DERMNB_DATA
                 )->pd.DataFrame:
    "ISIC 2017 Part 3 labels joined with age/sex, one row per image_id."
    d = data_root(root)/'isic2017'
    gt = pd.read_csv(_need(d/'ISIC-2017_Training_Part3_GroundTruth.csv', 'isic2017'))
    md = pd.read_csv(_need(d/'ISIC-2017_Training_Data_metadata.csv', 'isic2017'))
    if not {'image_id', 'melanoma', 'seborrheic_keratosis'} <= set(gt.columns):
        raise DataError(f"{d/'ISIC-2017_Training_Part3_GroundTruth.csv'}: columns {list(gt.columns)} lack image_id/melanoma/seborrheic_keratosis")
    orig = np.where(gt.melanoma > .5, 'melanoma', np.where(gt.seborrheic_keratosis > .5, 'seborrheic_keratosis', 'nevus'))
    gt['diagnosis_orig'] = orig
    gt['diagnosis'] = pd.Series(orig).map({'melanoma': 'melanoma', 'seborrheic_keratosis': 'benign_keratosis', 'nevus': 'nevus'})
    return gt.merge(md, on='image_id', how='left').set_index('image_id')


# %%
#| export
def load_isic2019_labels(root:str|Path|None=None # data root; default $DERMNB_DATA
                        )->pd.DataFrame:
    "ISIC 2019 one-hot ground truth as a label column, joined with the metadata, one row per image."
    d = data_root(root)/'isic2019'
    gt = pd.read_csv(_need(d/'ISIC_2019_Training_GroundTruth.csv', 'isic2019'))
    md = pd.read_csv(_need(d/'ISIC_2019_Training_Metadata.csv', 'isic2019'))
    cls = [c for c in ISIC2019_MAP if c in gt.columns]
    if 'image' not in gt.columns or len(cls) < 8:
        raise DataError(f"{d/'ISIC_2019_Training_GroundTruth.csv'}: expected columns image + {list(ISIC2019_MAP)}")
    gt['diagnosis_orig'] = gt[cls].idxmax(axis=1)
    gt['diagnosis'] = gt.diagnosis_orig.map(ISIC2019_MAP)
    return gt[['image', 'diagnosis_orig', 'diagnosis']].merge(md, on='image', how='left').set_index('image')


# %%
l17 = load_isic2017(ROOT)
test_eq(len(l17), 2000)
test_eq(l17.diagnosis.value_counts()[['melanoma', 'benign_keratosis', 'nevus']].tolist(), [374, 254, 1372])
l19 = load_isic2019_labels(ROOT)
test_eq(len(l19), 5984); test_eq(l19.diagnosis_orig.value_counts()['NV'], 4323)


# %% [markdown]
# ## ENHANCE crowd scores
#
# ENHANCE collected asymmetry, border and colour scores from three crowd raters for ISIC 2017 and PH2 images.
# They become concepts (`crowd_asymmetry`, ...: the mean of the raters) on the matching records.

# %%
#| export
def load_enhance(root:str|Path|None=None # data root; default $DERMNB_DATA
                )->pd.DataFrame:
    "ENHANCE crowd A/B/C scores: one row per image id, rater columns and the mean per criterion."
    d = data_root(root)/'enhance'/'crowd'
    frames = []
    for suffix in ('', '_ph2'):
        parts = []
        for crit in ('asymmetry', 'border', 'color'):
            df = pd.read_csv(_need(d/f'{crit}{suffix}.csv', 'enhance')).set_index('ID')
            raters = [c for c in df.columns]
            df = df.rename(columns={c: f'{crit}_{c}' for c in raters})
            df[f'crowd_{crit}'] = df.mean(axis=1)
            parts.append(df)
        frames.append(pd.concat(parts, axis=1))
    out = pd.concat(frames); out.index.name = 'id'
    return out


# %%
en = load_enhance(ROOT)
test_eq(len(en), 1450)
test_close(en.loc['ISIC_0000000', 'crowd_border'], 5.0)   # raters 6, 6, 3

# %% [markdown]
# ## ISIC 2018 Task 1
#
# Images `ISIC_xxxxxxx.jpg` pair with masks `ISIC_xxxxxxx_segmentation.png` by id. The ISIC 2017 and 2019 labels and
# metadata attach where the ids match (the official ISIC 2019 training set contains the 2017/2018 images; the copy in
# this workplace has only its HAM10000 part, so here the 2017 labels do the work), and so do the ENHANCE scores.

# %%
#| export
_ISIC_ID = re.compile(r'^(ISIC_\d{7})')

def _attach_isic_labels(rec:Record, l17:pd.DataFrame|None, l19:pd.DataFrame|None, en:pd.DataFrame|None):
    "Fill diagnosis, metadata and crowd concepts of an ISIC record from the joined label tables."
    if l19 is not None and rec.id in l19.index:
        r = l19.loc[rec.id]
        rec.diagnosis, rec.diagnosis_orig = r.diagnosis, f'isic2019:{r.diagnosis_orig}'
        rec.meta.update(age=_age(r.get('age_approx')), sex=_str(r.get('sex')), site=_str(r.get('anatom_site_general')),
                        lesion_id=_str(r.get('lesion_id')))
    if l17 is not None and rec.id in l17.index:
        r = l17.loc[rec.id]
        if rec.diagnosis is None: rec.diagnosis, rec.diagnosis_orig = r.diagnosis, f'isic2017:{r.diagnosis_orig}'
        rec.meta.setdefault('age', _age(r.get('age_approximate'))); rec.meta.setdefault('sex', _str(r.get('sex')))
    if en is not None and rec.id in en.index:
        rec.concepts.update({k: float(en.loc[rec.id, k]) for k in ('crowd_asymmetry', 'crowd_border', 'crowd_color')})

def _optional(fn, root):
    "Load an optional join table; absent datasets simply do not join."
    try: return fn(root)
    except DataError: return None

def load_isic2018_task1(root:str|Path|None=None, # data root; default $DERMNB_DATA
                        strict:bool=False, # raise on the first unpaired file instead of skipping it
                        join:bool=True # attach ISIC 2017/2019 labels and ENHANCE scores where ids match
                       )->Records:
    "ISIC 2018 Task 1 image/mask pairs as records, with labels joined from ISIC 2017/2019."
    root = data_root(root); d = _need(root/'isic2018_task1', 'isic2018_task1')
    idir = _need(d/'ISIC2018_Task1-2_Training_Input', 'isic2018_task1')
    mdir = _need(d/'ISIC2018_Task1_Training_GroundTruth', 'isic2018_task1')
    imgs = {m.group(1): p for p in idir.iterdir() if p.suffix.lower() == '.jpg' and (m := _ISIC_ID.match(p.name))}
    masks = {m.group(1): p for p in mdir.iterdir() if p.name.endswith('_segmentation.png') and (m := _ISIC_ID.match(p.name))}
    if not imgs: raise DataError(f"isic2018_task1: no ISIC_xxxxxxx.jpg images in {idir}")
    bad = _Problems('isic2018_task1', strict)
    for i in sorted(set(imgs) - set(masks)): bad(imgs[i], f'image has no mask (expected {mdir/(i + "_segmentation.png")})')
    for i in sorted(set(masks) - set(imgs)): bad(masks[i], f'mask has no image (expected {idir/(i + ".jpg")})')
    l17, l19, en = (_optional(load_isic2017, root), _optional(load_isic2019_labels, root), _optional(load_enhance, root)) if join else (None,)*3
    recs = []
    for i in sorted(set(imgs) & set(masks)):
        rec = Record(i, 'isic2018_task1', imgs[i], masks[i])
        _attach_isic_labels(rec, l17, l19, en)
        recs.append(rec)
    return bad.done(recs)


# %%
t1 = load_isic2018_task1(ROOT)
test_eq(len(t1), 2294); test_eq(t1.skipped, [])
test_eq(sum(r.diagnosis is not None for r in t1), 1610)          # the ISIC 2017 ids
test_eq(Counter(r.diagnosis for r in t1 if r.diagnosis)['melanoma'], 313)


# %% [markdown]
# ## ISIC 2019, PH2 and Derm7pt
#
# ISIC 2019 (HAM10000 part here) brings `lesion_id`, which the splits use to keep all images of one lesion together.
# PH2 stores each case in its own folder with a BMP image and a BMP lesion mask; its Excel table (legend rows on top)
# holds the diagnosis and the dermoscopic structures. Derm7pt's `meta.csv` holds the diagnosis and the 7-point
# criteria per image.

# %%
#| export
def load_isic2019(root:str|Path|None=None, # data root; default $DERMNB_DATA
                  strict:bool=False # raise when a labelled image is missing instead of skipping it
                 )->Records:
    "ISIC 2019 training images with diagnosis and metadata (age, sex, site, lesion_id)."
    root = data_root(root); idir = _need(root/'isic2019'/'ISIC_2019_Training_Input', 'isic2019')
    lab = load_isic2019_labels(root)
    present = {p.stem: p for p in idir.glob('ISIC_*.jpg')}
    bad, recs = _Problems('isic2019', strict), []
    for i, r in lab.iterrows():
        if i not in present: bad(idir/f'{i}.jpg', 'labelled in ISIC_2019_Training_GroundTruth.csv but the image is missing'); continue
        recs.append(Record(i, 'isic2019', present[i], None, r.diagnosis, r.diagnosis_orig,
                           meta=dict(age=_age(r.age_approx), sex=_str(r.sex), site=_str(r.anatom_site_general),
                                     lesion_id=_str(r.lesion_id))))
    return bad.done(recs)


# %%
#| export
PH2_MAP = {'Common Nevus': 'nevus', 'Atypical Nevus': 'nevus', 'Melanoma': 'melanoma'}
_PH2_CODES = {'A': 'absent', 'P': 'present', 'T': 'typical', 'AT': 'atypical'}
_PH2_COLORS = ['White', 'Red', 'Light-Brown', 'Dark-Brown', 'Blue-Gray', 'Black']

def load_ph2_table(root:str|Path|None=None # data root; default $DERMNB_DATA
                  )->pd.DataFrame:
    "The official PH2 table (legend rows skipped): diagnosis and dermoscopic concepts per image."
    xl = _need(data_root(root)/'ph2'/'PH2Dataset'/'PH2_dataset.xlsx', 'ph2')
    raw = pd.read_excel(xl, header=None)
    hdr = raw.index[raw[0].astype(str).str.strip() == 'Image Name']
    if not len(hdr): raise DataError(f"{xl}: no 'Image Name' header row; is this the official PH2_dataset.xlsx?")
    df = raw.iloc[hdr[0]+1:].copy(); df.columns = [str(c).split('\n')[0].strip() for c in raw.iloc[hdr[0]]]
    df = df[df['Image Name'].astype(str).str.match(r'IMD\d+')].set_index('Image Name')
    dx = df[list(PH2_MAP)].notna()
    df['diagnosis_orig'] = dx.idxmax(axis=1).where(dx.any(axis=1))
    return df

def _ph2_concepts(row)->dict:
    "PH2 table row -> concept dict with readable values."
    c = {'asymmetry': int(row['Asymmetry'])}
    for col, key in [('Pigment Network', 'pigment_network'), ('Dots/Globules', 'dots_globules'), ('Streaks', 'streaks'),
                     ('Regression Areas', 'regression_areas'), ('Blue-Whitish Veil', 'blue_whitish_veil')]:
        c[key] = _PH2_CODES.get(str(row[col]).strip(), str(row[col]).strip())
    c['colors'] = [k.lower() for k in _PH2_COLORS if isinstance(row.get(k), str) and row[k].strip().upper() == 'X']
    return c


# %%
#| export
def load_ph2(root:str|Path|None=None, # data root; default $DERMNB_DATA
             strict:bool=False, # raise on the first case without image or mask instead of skipping it
             join:bool=True # attach ENHANCE crowd scores
            )->Records:
    "PH2 cases (BMP image + lesion mask) with diagnosis and expert concepts from PH2_dataset.xlsx."
    root = data_root(root); base = _need(root/'ph2'/'PH2Dataset'/'PH2 Dataset images', 'ph2')
    tab, en = load_ph2_table(root), (_optional(load_enhance, root) if join else None)
    bad, recs = _Problems('ph2', strict), []
    for case in sorted(p for p in base.iterdir() if p.is_dir()):
        i = case.name
        img, msk = case/f'{i}_Dermoscopic_Image'/f'{i}.bmp', case/f'{i}_lesion'/f'{i}_lesion.bmp'
        if not img.exists(): bad(img, 'case folder has no dermoscopic image'); continue
        if not msk.exists(): bad(msk, 'image has no lesion mask'); continue
        rec = Record(i, 'ph2', img, msk)
        if i in tab.index:
            row = tab.loc[i]; rec.diagnosis_orig = row.diagnosis_orig
            rec.diagnosis = PH2_MAP.get(row.diagnosis_orig); rec.concepts = _ph2_concepts(row)
            if isinstance(row.get('Histological Diagnosis'), str): rec.meta['histology'] = row['Histological Diagnosis']
        if en is not None and i in en.index:
            rec.concepts.update({k: float(en.loc[i, k]) for k in ('crowd_asymmetry', 'crowd_border', 'crowd_color')})
        recs.append(rec)
    return bad.done(recs)


# %%
#| export
DERM7PT_CRITERIA = ['pigment_network', 'streaks', 'pigmentation', 'regression_structures', 'dots_and_globules',
                    'blue_whitish_veil', 'vascular_structures']

def derm7pt_label(dx:str # Derm7pt diagnosis string
                 )->str:
    "Map a Derm7pt diagnosis (20 classes) onto the shared vocabulary."
    dx = dx.lower()
    if dx.startswith('melanoma'): return 'melanoma'
    if 'nevus' in dx: return 'nevus'
    return {'basal cell carcinoma': 'basal_cell_carcinoma', 'seborrheic keratosis': 'benign_keratosis',
            'lentigo': 'benign_keratosis', 'dermatofibroma': 'dermatofibroma',
            'vascular lesion': 'vascular_lesion'}.get(dx, 'other')


# %%
#| export
def load_derm7pt(root:str|Path|None=None, # data root; default $DERMNB_DATA
                 strict:bool=False # raise when a meta row has no image instead of skipping it
                )->Records:
    "Derm7pt dermoscopic images with diagnosis and the 7-point checklist criteria as concepts."
    root = data_root(root); d = root/'derm7pt'
    meta = pd.read_csv(_need(d/'meta'/'meta.csv', 'derm7pt')); idir = _need(d/'images', 'derm7pt')
    missing = {'diagnosis', 'derm', *DERM7PT_CRITERIA} - set(meta.columns)
    if missing: raise DataError(f"{d/'meta'/'meta.csv'}: missing columns {sorted(missing)}")
    bad, recs = _Problems('derm7pt', strict), []
    for _, r in meta.iterrows():
        img = idir/r.derm
        if not img.exists(): bad(img, 'listed in meta.csv but the image is missing'); continue
        recs.append(Record(Path(r.derm).stem, 'derm7pt', img, None, derm7pt_label(r.diagnosis), r.diagnosis,
                           concepts={k: r[k] for k in DERM7PT_CRITERIA},
                           meta={k: _str(r[k]) for k in ('sex', 'location') if k in r}))
    return bad.done(recs)


# %%
i19 = load_isic2019(ROOT); test_eq(len(i19), 5984)
test_eq(Counter(r.diagnosis for r in i19)['melanoma'], 491)
ph2 = load_ph2(ROOT); test_eq(len(ph2), 200)
test_eq(Counter(r.diagnosis_orig for r in ph2), {'Common Nevus': 80, 'Atypical Nevus': 80, 'Melanoma': 40})
test_eq(set(ph2[0].concepts) >= {'asymmetry', 'streaks', 'blue_whitish_veil', 'colors', 'crowd_color'}, True)
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter('always'); d7 = load_derm7pt(ROOT)
test_eq(len(d7), 1010); test_eq(len(d7.skipped), 1)               # FCL/Fcl068.jpg is listed but absent
assert 'Fcl068' in d7.skipped[0][0] and any('skipped 1' in str(x.message) for x in w)
test_fail(lambda: load_derm7pt(ROOT, strict=True), contains='Fcl068.jpg')

# %% [markdown]
# ## One entry point
#
# `load_records(name)` dispatches to the loaders above. ISIC 2017 and ENHANCE are label tables without their own
# images here; they reach the records through the joins.

# %%
#| export
LOADERS = {'isic2018_task1': load_isic2018_task1, 'isic2019': load_isic2019, 'ph2': load_ph2, 'derm7pt': load_derm7pt}

def load_records(dataset:str, # one of LOADERS: isic2018_task1, isic2019, ph2, derm7pt
                 root:str|Path|None=None, # data root; default $DERMNB_DATA
                 strict:bool=False # raise on the first bad item instead of skipping it
                )->Records:
    "Load the records of one image dataset."
    if dataset not in LOADERS: raise DataError(f"Unknown image dataset {dataset!r}; choose from {sorted(LOADERS)}")
    return LOADERS[dataset](root, strict=strict)


# %%
test_fail(lambda: load_records('isic2020'), contains='isic2018_task1')


# %% [markdown]
# ## Verifying files
#
# Listing files is cheap; opening them is not (the official ISIC 2018 images are up to 6000×4000). `verify_records`
# opens every image and mask once: corrupt or truncated images, masks whose size differs from their image, and
# non-binary masks are reported with the file name (strict) or skipped and counted (lenient). The torch dataset
# performs the same checks lazily on every item it reads.

# %%
#| export
def check_record(rec:Record)->None:
    "Open a record's image (and mask) and raise `DataError` naming the file if anything is wrong."
    img = load_image(rec.image)
    if rec.mask is not None: load_mask(rec.mask, size=img.size)


# %%
#| export
def verify_records(records:Sequence[Record], # records to check
                   strict:bool=False # raise on the first problem instead of skipping it
                  )->Records:
    "Open every image and mask; keep the good records, count (lenient) or raise on (strict) the bad ones."
    src = records[0].source if len(records) else 'records'
    bad, keep = _Problems(src, strict), []
    for r in records:
        try: check_record(r); keep.append(r)
        except DataError as e:
            if strict: raise
            bad.items.append((str(e).split(':')[0], str(e)))
    out = bad.done(keep); out.skipped = list(getattr(records, 'skipped', [])) + out.skipped
    return out


# %% [markdown]
# Every kind of broken input, on copies of real files in a temporary folder (the data root itself is never written):

# %%
def _mini_isic(tmp:Path, ids:Sequence[str])->Path:
    "Copy a few real ISIC 2018 pairs into an official-layout folder under tmp."
    src = ROOT/'isic2018_task1'
    for sub in ('ISIC2018_Task1-2_Training_Input', 'ISIC2018_Task1_Training_GroundTruth'): (tmp/'isic2018_task1'/sub).mkdir(parents=True)
    for i in ids:
        shutil.copy(src/'ISIC2018_Task1-2_Training_Input'/f'{i}.jpg', tmp/'isic2018_task1/ISIC2018_Task1-2_Training_Input')
        shutil.copy(src/'ISIC2018_Task1_Training_GroundTruth'/f'{i}_segmentation.png', tmp/'isic2018_task1/ISIC2018_Task1_Training_GroundTruth')
    return tmp

IDS = [r.id for r in t1[:4]]
with tempfile.TemporaryDirectory() as tmp:
    tmp = _mini_isic(Path(tmp), IDS); gtd = tmp/'isic2018_task1/ISIC2018_Task1_Training_GroundTruth'
    idir = tmp/'isic2018_task1/ISIC2018_Task1-2_Training_Input'
    test_eq(len(load_isic2018_task1(tmp, strict=True)), 4)
    # missing root / wrong layout: the message shows the expected layout
    test_fail(lambda: load_isic2018_task1(tmp/'nope'), contains='does not exist')
    test_fail(lambda: load_ph2(tmp), contains='IMDxxx_lesion.bmp')
    # an image without a mask, and a mask without an image
    (gtd/f'{IDS[0]}_segmentation.png').rename(tmp/'moved.png')
    test_fail(lambda: load_isic2018_task1(tmp, strict=True), contains=f'{IDS[0]}.jpg: image has no mask')
    with warnings.catch_warnings(record=True): lenient = load_isic2018_task1(tmp)
    test_eq((len(lenient), len(lenient.skipped)), (3, 1))
    (tmp/'moved.png').rename(gtd/f'{IDS[0]}_segmentation.png'); (idir/f'{IDS[1]}.jpg').rename(tmp/'moved.jpg')
    test_fail(lambda: load_isic2018_task1(tmp, strict=True), contains='mask has no image')
    (tmp/'moved.jpg').rename(idir/f'{IDS[1]}.jpg')
    # a mask whose size differs from its image; a non-binary mask; a truncated image
    Image.open(gtd/f'{IDS[0]}_segmentation.png').resize((100, 80)).save(gtd/f'{IDS[0]}_segmentation.png')
    m = np.asarray(Image.open(gtd/f'{IDS[1]}_segmentation.png')).copy(); m[0, :10] = 77
    Image.fromarray(m).save(gtd/f'{IDS[1]}_segmentation.png')
    b = (idir/f'{IDS[2]}.jpg').read_bytes(); (idir/f'{IDS[2]}.jpg').write_bytes(b[:len(b)//3])
    recs = load_isic2018_task1(tmp, strict=True)            # listing is fine; opening finds the problems
    test_fail(lambda: verify_records(recs, strict=True), contains='differs from its image')
    test_fail(lambda: check_record(recs[1]), contains='not binary')
    test_fail(lambda: check_record(recs[2]), contains=f'{IDS[2]}.jpg: unreadable or truncated')
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always'); good = verify_records(recs)
    test_eq([r.id for r in good], [IDS[3]]); test_eq(len(good.skipped), 3)
    assert any('skipped 3' in str(x.message) for x in w)

# %% [markdown]
# ## Leak-free, deterministic splits
#
# Images of the same lesion must never straddle train and test, so splits assign whole groups (`lesion_id` where the
# dataset has it, else the image id). Each group's split follows from a hash of its key and the seed alone, so the
# split does not depend on file-system order, and adding images (the full official release) never moves an image
# that was already assigned. `get_split` saves the assignment as a CSV in the
# cache (`$DERMNB_CACHE/splits/`) and reads it back, so every figure uses the same split; the data-overview figure
# also publishes it next to the figures.

# %%
#| export
SPLIT_FRACS = {'train': .7, 'val': .1, 'test': .2}

def make_splits(records:Sequence[Record], # records of one dataset
                seed:int=0, # split seed
                fracs:dict=SPLIT_FRACS # split name -> fraction of groups
               )->dict:
    "Assign each record id to a split, keeping every lesion_id group in one split."
    cuts = np.cumsum(list(fracs.values())); names = list(fracs)
    def which(group):  # a uniform number per (group, seed), the same whatever other images exist
        u = int(stable_hash([group, seed], n=15), 16) / 16**15
        return names[min(int(np.searchsorted(cuts, u, side='right')), len(names) - 1)]
    return {r.id: which(r.meta.get('lesion_id') or r.id) for r in records}


# %%
#| export
def split_file(dataset:str, # dataset key
               seed:int=0 # split seed
              )->Path:
    "Where the split assignment of a dataset is stored."
    return cache_root()/'splits'/f'{dataset}_seed{seed}.csv'


# %%
#| export
def get_split(dataset:str, # dataset key, e.g. 'isic2018_task1'
              split:str|None=None, # 'train', 'val', 'test', or None for all records (split in meta['split'])
              root:str|Path|None=None, # data root; default $DERMNB_DATA
              seed:int=0 # split seed
             )->Records:
    "Records of one split, using the saved split file (created on first use)."
    recs, f = load_records(dataset, root), split_file(dataset, seed)
    assign = make_splits(recs, seed)
    saved = pd.read_csv(f, dtype=str).set_index('id')['split'].to_dict() if f.exists() else None
    if saved is not None and set(saved) == set(assign): assign = saved   # same images: the saved file wins
    else: atomic_save(f, lambda t: pd.DataFrame({'id': list(assign), 'split': list(assign.values())}).to_csv(t, index=False))
    for r in recs: r.meta['split'] = assign[r.id]
    if split is None: return recs
    if split not in SPLIT_FRACS: raise DataError(f"Unknown split {split!r}; choose from {list(SPLIT_FRACS)}")
    return Records([r for r in recs if r.meta['split'] == split], recs.skipped)


# %%
sp = make_splits(i19, seed=0)
test_eq(sp, make_splits(list(reversed(i19)), seed=0))                  # independent of order
test_ne(sp, make_splits(i19, seed=1))
c = Counter(sp.values()); test_close(c['train'] / len(i19), .7, eps=.02)
test_eq({k: v for k, v in make_splits(i19[:100]).items()}, {r.id: sp[r.id] for r in i19[:100]})  # subsets keep their split
# leak-free: a lesion with several images stays in one split
fake = [Record(f'x{i}', 's', Path('.'), meta={'lesion_id': f'L{i//3}'}) for i in range(30)]
fs = make_splits(fake)
assert all(len({fs[f'x{3*j+k}'] for k in range(3)}) == 1 for j in range(10))
test_tr = get_split('isic2018_task1', 'test', ROOT)
test_eq(len(test_tr), Counter(make_splits(t1).values())['test'])
assert split_file('isic2018_task1').exists()
assert not {r.id for r in test_tr} & {r.id for r in get_split('isic2018_task1', 'train', ROOT)}


# %% [markdown]
# ## Torch datasets
#
# Dermoscopy images are not square (ISIC 2018 is 4:3), so the fit to a square model input is explicit:
# `pad` keeps the whole image and pads the short side with black (like a dermatoscope's vignette), `crop` fills the
# square and cuts the long side (centre crop; random when augmenting), `squash` resizes without keeping the aspect
# ratio (what ISIC 2019's 128×128 copy already did). Images resize with antialiasing; masks with nearest neighbour, so
# they stay binary. Augmentation is paired: the same flips and 90° rotations hit the image and its mask.

# %%
#| export
def fit_square(img:Image.Image, # image (RGB) or mask (L)
               size:int, # output side
               fit:str='pad', # 'pad', 'crop' or 'squash'
               is_mask:bool=False, # nearest-neighbour resampling, zero padding
               offset:float=.5 # crop position along the long side, 0..1 (0.5 = centre)
              )->Image.Image:
    "Resize an image or mask to a `size`×`size` square, handling the aspect ratio as `fit` says."
    rs = Image.NEAREST if is_mask else Image.BICUBIC
    w, h = img.size
    if fit == 'squash': return img.resize((size, size), rs)
    if fit == 'pad':
        s = size / max(w, h); nw, nh = max(1, round(w*s)), max(1, round(h*s))
        out = Image.new(img.mode, (size, size), 0)
        out.paste(img.resize((nw, nh), rs), ((size - nw)//2, (size - nh)//2)); return out
    if fit == 'crop':
        s = size / min(w, h); nw, nh = max(size, round(w*s)), max(size, round(h*s))
        img = img.resize((nw, nh), rs); x, y = round((nw - size)*offset), round((nh - size)*offset)
        return img.crop((x, y, x + size, y + size))
    raise DataError(f"Unknown fit {fit!r}; choose 'pad', 'crop' or 'squash'")


# %%
im = Image.new('RGB', (256, 192), (200, 100, 50)); mk = Image.new('L', (256, 192), 255)
p = fit_square(mk, 64, 'pad', is_mask=True)
test_eq(p.size, (64, 64)); test_eq(set(np.unique(np.asarray(p))), {0, 255}); test_eq(np.asarray(p)[32].min(), 255)
test_eq(np.asarray(p)[:, 32].sum() // 255, 48)                 # 4:3 -> 64x48 content, padded
test_eq(set(np.unique(np.asarray(fit_square(mk, 64, 'crop', True)))), {255})

# %% [markdown]
# ## Full-size images: decode at a reduced scale
#
# The official ISIC 2018 images are up to 6000×4000 pixels, and the quick profile resizes them to 64. Decoding every
# pixel of a 24-megapixel JPEG to keep one in 5000 wastes most of the data-preparation time. A JPEG can be decoded at
# 1/2, 1/4 or 1/8 of its size almost for free (PIL's `draft`, which scales the DCT blocks while decoding).
# `load_image_for` uses it only while the decoded image stays at least `DRAFT_MARGIN` times the size it is resized
# to, so the antialiased resize that follows still averages many pixels per output pixel. On the development copies
# (256×192 and smaller) no draft applies at any profile size, so their pixels are exactly those of `load_image`.
# Masks are PNG or BMP and always decode fully; their size is checked against the image's *full* size.

# %%
#| export
DRAFT_MARGIN = 4   # a JPEG is decoded at reduced scale only while it stays >= 4x its resized size

def _fit_dims(w:int, h:int, size:int, fit:str)->tuple:
    "The (width, height) that `fit_square` resizes a w×h image to before padding or cropping."
    if fit == 'squash': return size, size
    s = size / (max(w, h) if fit == 'pad' else min(w, h))
    return max(1, round(w*s)), max(1, round(h*s))

def load_image_for(path:str|Path, # image file
                   size:int, # square side it will be resized to
                   fit:str='pad', # 'pad', 'crop' or 'squash', as in `fit_square`
                   draft:bool=True # let big JPEGs decode at 1/2, 1/4 or 1/8 scale (see DRAFT_MARGIN)
                  )->tuple:
    "Read an image that will be resized to `size`: (RGB image, its full (width, height))."
    path = Path(path)
    if not draft or path.suffix.lower() not in ('.jpg', '.jpeg'): im = load_image(path); return im, im.size
    if not path.is_file(): raise DataError(f"{path}: image file not found")
    try:
        with Image.open(path) as im:
            full = im.size; nw, nh = _fit_dims(*full, size, fit)
            rw, rh = DRAFT_MARGIN * nw, DRAFT_MARGIN * nh
            if im.format == 'JPEG' and min(full[0] // rw, full[1] // rh) >= 2: im.draft(im.mode, (rw, rh))
            im.load()
            return im.convert('RGB'), full
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{path}: unreadable or truncated image ({type(e).__name__}: {e})") from e


# %%
_src = t1[0].image
test_eq(np.asarray(load_image_for(_src, 64)[0]), np.asarray(load_image(_src)))   # 256x192 at 64 px: no draft
with tempfile.TemporaryDirectory() as tmp:
    big = Path(tmp)/'big.jpg'; load_image(_src).resize((4096, 3072), Image.BICUBIC).save(big, quality=90)
    im, full = load_image_for(big, 64)
    test_eq(full, (4096, 3072)); test_eq(im.size, (512, 384))                     # decoded at 1/8 scale
    test_eq(load_image_for(big, 64, draft=False)[0].size, (4096, 3072))
    test_eq(load_image_for(big, 512)[0].size, (2048, 1536))                       # 512 px: 1/2 scale keeps 4x
    test_eq(load_image_for(big, 1024)[0].size, (4096, 3072))                      # 1024 px: no reduction keeps 4x
    a, b = (np.asarray(fit_square(load_image_for(big, 64, draft=d)[0], 64), dtype=float) for d in (True, False))
    psnr = 10 * np.log10(255**2 / ((a - b)**2).mean()); assert psnr > 35, psnr   # the resized pixels barely change
    (Path(tmp)/'cut.jpg').write_bytes(big.read_bytes()[:5000])
    test_fail(lambda: load_image_for(Path(tmp)/'cut.jpg', 64), contains='cut.jpg: unreadable or truncated')


# %% [markdown]
# `item_arrays` is what the torch dataset does with one record: read the image (at reduced scale when that is safe),
# fit it to the square, and the same for its mask: a uint8 image tensor and a bool mask tensor.

# %%
#| export
def item_arrays(rec:Record, # the record to read
                size:int, # square side
                fit:str='pad', # aspect-ratio handling, as in `fit_square`
                with_mask:bool=True, # also read the record's mask, if it has one
                draft:bool=True # reduced-scale JPEG decoding for big images (see `load_image_for`)
               )->tuple:
    "One record as tensors: uint8 image (3, S, S) and bool mask (1, S, S), or None."
    img, full = load_image_for(rec.image, size, fit, draft)
    x = torch.from_numpy(np.asarray(fit_square(img, size, fit), dtype=np.uint8).copy()).permute(2, 0, 1)
    m = None
    if with_mask and rec.mask is not None:
        m = torch.from_numpy(np.asarray(fit_square(Image.fromarray(load_mask(rec.mask, size=full)), size, fit,
                                                   is_mask=True)).copy())[None]
    return x, m


# %%
x, m = item_arrays(t1[0], 64)
test_eq((x.shape, x.dtype, m.shape, m.dtype), ((3, 64, 64), torch.uint8, (1, 64, 64), torch.bool)); assert m.any() and not m.all()
test_eq(item_arrays(i19[0], 32)[1], None)

# %% [markdown]
# ## A cache of decoded arrays
#
# Every figure notebook runs in its own process and prepares its data again. On full-size data that is most of a
# quick run's data time, so the decoded, resized arrays are cached: one entry per dataset, size, fit and file list,
# under `$DERMNB_CACHE/arrays/<dataset>/`. The key holds every file's path, byte size and modification time, so
# replacing, adding or touching a file makes a new entry instead of serving stale pixels; it also holds the draft
# margin and the Pillow version (whose resampling defines the pixels). Entries are written through `cached_dir`, so a
# crash while building leaves none. `benchmarks/data_prep.py` measures the first and the cached run on simulated
# full-size inputs. Set `DERMNB_ARRAY_CACHE=0` to turn the cache off.

# %%
#| export
from dermnb.core import cached_dir

ARRAY_CACHE_VERSION = 1   # bump when the stored arrays change meaning

def array_cache_key(records:Sequence[Record], # records, in dataset order
                    size:int, # square side
                    fit:str='pad', # aspect-ratio handling
                    with_mask:bool=True, # masks included
                    draft:bool=True # reduced-scale JPEG decoding
                   )->dict:
    "The cache key of a record list's arrays: dataset, size, fit and a hash of every file's path, size and mtime."
    def stat(p):
        try: st = os.stat(p); return [str(p), st.st_size, st.st_mtime_ns]
        except OSError: return [str(p), None, None]
    files = [stat(r.image) + (stat(r.mask) if with_mask and r.mask is not None else []) for r in records]
    import PIL
    return {'dataset': '+'.join(sorted({r.source for r in records})) or 'empty', 'size': size, 'fit': fit,
            'with_mask': bool(with_mask), 'draft_margin': DRAFT_MARGIN if draft else 0, 'n': len(records),
            'files': stable_hash(files, n=24), 'pillow': PIL.__version__, 'version': ARRAY_CACHE_VERSION}


# %%
#| export
def cached_arrays(records:Sequence[Record], # records, in dataset order
                  size:int, # square side
                  fit:str='pad', # aspect-ratio handling
                  with_mask:bool=True, # include masks (records without one get an all-zero mask and has_mask False)
                  draft:bool=True, # reduced-scale JPEG decoding (see `load_image_for`)
                  build:bool=True, # decode and store the arrays on a miss; False returns None on a miss
                  root:str|Path|None=None, # cache root override
                  progress:bool=False # tqdm bar while decoding
                 )->dict|None:
    "Decoded, resized arrays of `records` from the dermnb cache, built on a miss: uint8 images, bool masks, has_mask."
    key = array_cache_key(records, size, fit, with_mask, draft)
    kind = f"arrays/{key['dataset']}"
    final = cache_root(root)/kind/stable_hash(key)
    if not (final/'images.npy').exists():
        if not build: return None
        def fill(p:Path):
            from tqdm.auto import tqdm
            xs = np.lib.format.open_memmap(p/'images.npy', 'w+', np.uint8, (len(records), 3, size, size))
            ms = np.lib.format.open_memmap(p/'masks.npy', 'w+', bool, (len(records), 1, size, size)) if with_mask else None
            has = np.zeros(len(records), bool)
            for i, r in enumerate(tqdm(records, desc=f"decode {key['dataset']} {size}px", disable=not progress, leave=False)):
                x, m = item_arrays(r, size, fit, with_mask, draft); xs[i] = x.numpy()
                if m is not None: ms[i], has[i] = m.numpy(), True
            xs.flush(); del xs
            if ms is not None: ms.flush(); del ms
            np.save(p/'has_mask.npy', has)
        final = cached_dir(kind, key, fill, root=root)
    out = {'images': np.load(final/'images.npy', mmap_mode='r'), 'has_mask': np.load(final/'has_mask.npy'), 'path': final}
    out['masks'] = np.load(final/'masks.npy', mmap_mode='r') if (final/'masks.npy').exists() else None
    return out

def _array_cache_on()->bool: return os.environ.get('DERMNB_ARRAY_CACHE', '1') not in ('0', 'false', 'no', 'off')


# %%
with tempfile.TemporaryDirectory() as tmp:
    recs = t1[:3]
    test_eq(cached_arrays(recs, 32, build=False, root=tmp), None)                 # a miss without build
    c = cached_arrays(recs, 32, root=tmp)
    test_eq((c['images'].shape, c['masks'].shape, c['has_mask'].tolist()), ((3, 3, 32, 32), (3, 1, 32, 32), [True]*3))
    for i, r in enumerate(recs):                                                  # the same pixels as reading the files
        x, m = item_arrays(r, 32); test_eq(c['images'][i], x.numpy()); test_eq(c['masks'][i], m.numpy())
    test_eq(cached_arrays(recs, 32, build=False, root=tmp)['path'], c['path'])    # a hit
    test_ne(array_cache_key(recs, 32), array_cache_key(recs, 32, fit='crop'))
    test_ne(array_cache_key(recs, 32), array_cache_key(recs[:2], 32))
    # touching or replacing a file makes a new key (copies in a temp root; the data root is never written)
    mini = load_isic2018_task1(_mini_isic(Path(tmp)/'root', [r.id for r in recs]), join=False)
    k0 = array_cache_key(mini, 32); os.utime(mini[1].mask, ns=(1, 1))
    test_ne(array_cache_key(mini, 32), k0)


# %%
#| export
class DermDataset(torch.utils.data.Dataset):
    "Torch dataset of records: image in [-1,1], optional binary mask, label, caption and concepts."
    def __init__(self, records:Sequence[Record], # records to serve
                 size:int=64, # square side in pixels
                 fit:str='pad', # aspect-ratio handling: 'pad', 'crop' or 'squash'
                 augment:bool=False, # paired random flips and 90° rotations of image and mask
                 caption_fn:Callable[[Record], str]|None=None, # record -> caption (e.g. a concept caption)
                 with_mask:bool=True, # return masks when records have them
                 in_memory:bool=False, # decode every item once and keep the tensors (fast repeated epochs)
                 cache:bool|None=None, # arrays in the dermnb cache: None reuses an entry and builds one when every item is read (in_memory, images_uint8); True always; False never
                 draft:bool=True # big JPEGs decode at reduced scale (no effect below DRAFT_MARGIN x the size)
                ):
        self.records, self.size, self.fit, self.augment = list(records), size, fit, augment
        self.caption_fn, self.with_mask, self._mem = caption_fn, with_mask, {} if in_memory else None
        self.cache, self.draft, self._arrays = cache, draft, None

    def __len__(self): return len(self.records)

    def _cached(self, build:bool):
        "The cached arrays of this dataset, or None (looked up once; decoded and stored when `build`)."
        if self.cache is False or (self.cache is None and not _array_cache_on()) or not self.records: return None
        if self._arrays is None or (build and self._arrays is False):
            try: self._arrays = cached_arrays(self.records, self.size, self.fit, self.with_mask, self.draft, build=build) or False
            except OSError as e:   # a full or read-only cache: read the files instead
                warnings.warn(f"array cache unavailable ({e}); decoding the images instead"); self.cache = False; return None
        return self._arrays or None

    def _load(self, i):
        c = self._cached(build=self.cache is True or self._mem is not None)
        if c is None: return item_arrays(self.records[i], self.size, self.fit, self.with_mask, self.draft)
        m = c['masks'] is not None and c['has_mask'][i] and self.with_mask
        return torch.from_numpy(np.array(c['images'][i])), (torch.from_numpy(np.array(c['masks'][i])) if m else None)

    def __getitem__(self, i):
        if self._mem is not None and i in self._mem: x, m = self._mem[i]
        else:
            x, m = self._load(i)
            if self._mem is not None: self._mem[i] = (x, m)
        if self.augment:
            k, fh = int(torch.randint(4, ())), bool(torch.randint(2, ()))
            x = torch.rot90(x, k, (1, 2)); x = x.flip(2) if fh else x
            if m is not None: m = torch.rot90(m, k, (1, 2)); m = m.flip(2) if fh else m
        r = self.records[i]
        out = {'image': x.float() / 127.5 - 1, 'label': r.label, 'id': r.id,
               'caption': self.caption_fn(r) if self.caption_fn else ''}
        if m is not None: out['mask'] = (m > 0).float()
        return out

    def images_uint8(self)->torch.Tensor:
        "All images as one uint8 tensor (N, 3, S, S), without augmentation."
        c = self._cached(build=True)
        return torch.from_numpy(np.array(c['images'])) if c is not None else torch.stack([self._load(i)[0] for i in range(len(self))])


# %%
ds = DermDataset(t1[:8], size=64, augment=True, caption_fn=lambda r: f'{r.diagnosis} lesion', in_memory=True)
b = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
test_eq(b['image'].shape, (4, 3, 64, 64)); test_eq(b['mask'].shape, (4, 1, 64, 64))
assert b['image'].min() >= -1 and b['image'].max() <= 1
test_eq(set(b['mask'].unique().tolist()) <= {0., 1.}, True)
# paired augmentation: the mask moves with the image (black padding and zero mask stay aligned)
torch.manual_seed(0); it = ds[0]; pad = (it['image'] == -1).all(0)
assert not (pad & (it['mask'][0] > 0)).any()
test_eq(len(DermDataset(i19[:3], 32)[0].keys() & {'mask'}), 0)     # no mask for ISIC 2019


# %% [markdown]
# The cache and the reduced-scale decoding change no pixel of the default path: on the development copies, every
# fit and profile size gives exactly what decoding each file with `load_image` and `fit_square` gives (the code
# before the cache), whether the arrays come from the files, a fresh cache entry, or an existing one. The dataset
# reuses an entry without being asked, and builds one when it is asked for every item (`in_memory`, `images_uint8`).

# %%
def _today(r, size, fit):
    "The pixels DermDataset served before the array cache: full decode, fit_square."
    img = load_image(r.image); x = np.asarray(fit_square(img, size, fit), dtype=np.uint8).transpose(2, 0, 1)
    m = None if r.mask is None else np.asarray(fit_square(Image.fromarray(load_mask(r.mask, size=img.size)), size, fit, is_mask=True))[None]
    return x, m

_old_cache = os.environ.get('DERMNB_CACHE')
with tempfile.TemporaryDirectory() as tmp:
    os.environ['DERMNB_CACHE'] = tmp
    recs = t1[:4] + ph2[:2] + d7[:2]
    for size, fit in [(64, 'pad'), (64, 'crop'), (64, 'squash'), (128, 'pad'), (512, 'squash')]:
        ref = [_today(r, size, fit) for r in recs]
        lazy = DermDataset(recs, size, fit)                                   # no entry yet: reads the files
        test_eq(lazy._cached(build=False), None)
        for ds in (lazy, DermDataset(recs, size, fit, cache=False), DermDataset(recs, size, fit, in_memory=True),
                   DermDataset(recs, size, fit), DermDataset(recs, size, fit, draft=False)):
            for (x0, m0), i in zip(ref, range(len(recs))):
                x, m = ds._load(i); test_eq(x.numpy(), x0); test_eq(x.dtype, torch.uint8)
                test_eq(None if m is None else m.numpy(), m0); assert m is None or m.dtype == torch.bool
        test_eq(DermDataset(recs, size, fit).images_uint8().numpy(), np.stack([x for x, _ in ref]))
    assert DermDataset(recs, 64)._cached(build=False) is not None            # the in_memory dataset left an entry
    test_eq(len(list((Path(tmp)/'arrays').rglob('images.npy'))), 5)
    os.environ['DERMNB_ARRAY_CACHE'] = '0'; assert DermDataset(recs, 64)._cached(build=True) is None
    os.environ['DERMNB_CACHE'] = '/proc/no-cache-here'                     # an unwritable cache: the files are read instead
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always'); del os.environ['DERMNB_ARRAY_CACHE']
        test_eq(DermDataset(recs, 64, 'crop', in_memory=True)._load(0)[0].numpy(), _today(recs[0], 64, 'crop')[0])
    assert any('array cache unavailable' in str(x.message) for x in w)
    os.environ['DERMNB_CACHE'] = tmp
    b2 = next(iter(torch.utils.data.DataLoader(DermDataset(t1[:8], 64, in_memory=True), batch_size=8)))
    test_eq(b2['image'], next(iter(torch.utils.data.DataLoader(DermDataset(t1[:8], 64, cache=False), batch_size=8)))['image'])
if _old_cache is None: del os.environ['DERMNB_CACHE']
else: os.environ['DERMNB_CACHE'] = _old_cache


# %% [markdown]
# ## Dataset summary
#
# `data_summary` counts images, masks, labels, concepts and splits per dataset. It backs `dermnb data summary`
# and the data-overview figure.

# %%
#| export
def _concept_counts(recs:Sequence[Record])->dict:
    "Value counts of every categorical concept (lists are counted per item; numbers are summarised)."
    out = {}
    for k in sorted({k for r in recs for k in r.concepts}):
        vals = [r.concepts[k] for r in recs if k in r.concepts]
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals) and len(set(vals)) > 5:
            out[k] = {'n': len(vals), 'mean': round(float(np.mean(vals)), 3)}
        else:
            flat = [x for v in vals for x in (v if isinstance(v, list) else [v])]
            out[k] = dict(Counter(map(str, flat)).most_common())
    return out

def data_summary(root:str|Path|None=None, # data root; default $DERMNB_DATA
                 seed:int=0 # split seed
                )->dict:
    "Counts per dataset: images, masks, skipped items, diagnoses, concepts and split sizes."
    root = data_root(root); out = {}
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        for name in LOADERS:
            try: recs = get_split(name, None, root, seed)
            except DataError as e: out[name] = {'images': 0, 'error': str(e)}; continue
            s = {'images': len(recs), 'skipped': len(recs.skipped)}
            if name in ('isic2018_task1', 'ph2'): s['masks'] = sum(r.mask is not None for r in recs)
            s['diagnosis'] = dict(Counter(r.diagnosis or 'unlabelled' for r in recs).most_common())
            s['splits'] = dict(sorted(Counter(r.meta['split'] for r in recs).items()))
            s['concepts'] = _concept_counts(recs)
            out[name] = s
    try:
        l17 = load_isic2017(root); ids = {p.stem for p in (root/'isic2018_task1'/'ISIC2018_Task1-2_Training_Input').glob('ISIC_*.jpg')}
        out['isic2017'] = {'images': len(l17), 'with_isic2018_task1_image': len(set(l17.index) & ids),
                           'diagnosis': {k: int(v) for k, v in l17.diagnosis.value_counts().items()}}
    except DataError as e: out['isic2017'] = {'images': 0, 'error': str(e)}
    try:
        en = load_enhance(root)
        out['enhance'] = {'images': len(en), 'isic': int(en.index.str.startswith('ISIC').sum()),
                          'ph2': int(en.index.str.startswith('IMD').sum()), 'raters': 3}
    except DataError as e: out['enhance'] = {'images': 0, 'error': str(e)}
    return {k: out[k] for k in DATASETS}


# %%
s = data_summary(ROOT)
test_eq([s[k]['images'] for k in DATASETS], [2294, 2000, 5984, 200, 1010, 1450])
test_eq((s['isic2018_task1']['masks'], s['ph2']['masks']), (2294, 200))
test_eq(s['isic2017']['with_isic2018_task1_image'], 1610)
test_eq(sum(s['isic2019']['splits'].values()), 5984)
assert json.loads(json.dumps(s)) == s          # plain JSON, for `dermnb data summary --json`


# %% [markdown]
# ## Records as a table
#
# For statistics and plots, `records_frame` flattens records into a DataFrame: one row per image with its diagnosis,
# split, concepts, image size (read from the file header, without decoding) and, for datasets with masks, the lesion's
# share of the image.

# %%
#| export
def records_frame(records:Sequence[Record], # records (any mix of datasets)
                  sizes:bool=True, # read image width/height from the file headers
                  mask_fraction:bool=False # decode masks and add the lesion area fraction
                 )->pd.DataFrame:
    "One row per record: id, source, diagnosis, split, concepts, size and mask fraction."
    rows = []
    for r in records:
        row = {'id': r.id, 'source': r.source, 'diagnosis': r.diagnosis or 'unlabelled', 'diagnosis_orig': r.diagnosis_orig,
               'split': r.meta.get('split'), 'has_mask': r.mask is not None,
               **{f'meta_{k}': v for k, v in r.meta.items() if k != 'split'},
               **{f'concept_{k}': (', '.join(v) if isinstance(v, list) else v) for k, v in r.concepts.items()}}
        if sizes:
            try:
                with Image.open(r.image) as im: row['width'], row['height'] = im.size
            except OSError as e: raise DataError(f"{r.image}: unreadable image header ({e})") from e
        if mask_fraction and r.mask is not None: row['mask_fraction'] = float(load_mask(r.mask).mean())
        rows.append(row)
    return pd.DataFrame(rows)


# %%
fr = records_frame(ph2[:5], mask_fraction=True)
test_eq(fr[['width', 'height']].values.tolist(), [[256, 192]]*5)
assert fr.mask_fraction.between(0, 1).all() and 'concept_streaks' in fr
