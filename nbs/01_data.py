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

def split_file(dataset:str, # dataset key
               seed:int=0 # split seed
              )->Path:
    "Where the split assignment of a dataset is stored."
    return cache_root()/'splits'/f'{dataset}_seed{seed}.csv'

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
                 in_memory:bool=False # decode every item once and keep the tensors (fast repeated epochs)
                ):
        self.records, self.size, self.fit, self.augment = list(records), size, fit, augment
        self.caption_fn, self.with_mask, self._mem = caption_fn, with_mask, {} if in_memory else None

    def __len__(self): return len(self.records)

    def _load(self, i):
        r = self.records[i]; img = load_image(r.image)
        x = torch.from_numpy(np.asarray(fit_square(img, self.size, self.fit), dtype=np.uint8).copy()).permute(2, 0, 1)
        m = None
        if self.with_mask and r.mask is not None:
            m = torch.from_numpy(np.asarray(fit_square(Image.fromarray(load_mask(r.mask, size=img.size)), self.size,
                                                        self.fit, is_mask=True)).copy())[None]
        return x, m

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
        return torch.stack([self._load(i)[0] for i in range(len(self))])


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
