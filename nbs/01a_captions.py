# %% [markdown]
# # Captions
#
# > Text from records: the diagnosis in the dataset's words, the dermoscopic concepts that experts (PH2, Derm7pt) or
# > the crowd (ENHANCE) annotated, and site, age and sex, assembled into captions.
#
# Captions are text made from records, and several parts need the same text: the base diffusion model is conditioned
# on them, DermCLIP trains on them, and LesionGen and SkinDualGen prompt with them. They live here, right after the
# data layer, so that every later notebook uses one captioner.

# %%
#| default_exp captions

# %%
#| export
from __future__ import annotations
import re, functools, hashlib
from dataclasses import dataclass, asdict
from pathlib import Path
import numpy as np
from PIL import Image
from scipy import ndimage as ndi
from skimage.color import rgb2lab
from skimage.measure import perimeter
from typing import Sequence
from dermnb.core import DataError
from dermnb.pretrained import minilm_dir
from dermnb.data import Record, ISIC2019_MAP

# %%
from fastcore.test import test_eq, test_ne, test_fail
from dermnb.core import data_root
from dermnb.data import get_split, DermDataset
ROOT = data_root()

# %% [markdown]
# ## Captions from diagnosis, concepts and metadata
#
# DermCLIP learns from real image–caption pairs and the base model is conditioned on captions. A caption is assembled
# from what the datasets annotate: the diagnosis in the dataset's own words (PH2's "atypical nevus", Derm7pt's
# "clark nevus", ISIC 2019's "benign keratosis"), the dermoscopic structures that are *present* (PH2 experts,
# Derm7pt's 7-point criteria; absent ones are left out, because negations are what small text encoders read worst),
# ENHANCE crowd scores where no expert rated that criterion, and site, age and sex.

# %%
#| export
_DX_WORDS = {'seborrheic_keratosis': 'seborrheic keratosis', 'melanoma (in situ)': 'melanoma in situ',
             'melanoma (less than 0.76 mm)': 'melanoma thinner than 0.76 mm', 'melanoma (0.76 to 1.5 mm)': 'melanoma 0.76 to 1.5 mm thick',
             'melanoma (more than 1.5 mm)': 'melanoma thicker than 1.5 mm', 'miscellaneous': 'miscellaneous lesion', 'other': 'other lesion'}

def with_article(phrase:str # a noun phrase
                )->str:
    "Prefix 'a' or 'an' (also for numbers: 'an 80-year-old', 'an 18-year-old')."
    num = re.match(r'\d+', phrase)
    an = (num.group().startswith('8') or num.group() in ('11', '18')) if num else phrase[:1].lower() in 'aeiou'
    return f"{'an' if an else 'a'} {phrase}"


# %%
#| export
def diagnosis_phrase(rec:Record # a record with diagnosis / diagnosis_orig
                    )->str|None:
    "The diagnosis in the dataset's own words ('atypical nevus', 'basal cell carcinoma'), or None if unlabelled."
    orig = (rec.diagnosis_orig or '').split(':')[-1]
    if orig in ISIC2019_MAP: orig = ISIC2019_MAP[orig]
    if not orig: orig = rec.diagnosis or ''
    if not orig: return None
    return _DX_WORDS.get(orig, _DX_WORDS.get(orig.lower(), orig.lower().replace('_', ' ')))


# %%
test_eq(diagnosis_phrase(Record('a', 'isic2019', Path('.'), diagnosis='benign_keratosis', diagnosis_orig='isic2019:BKL')), 'benign keratosis')
test_eq(diagnosis_phrase(Record('a', 'ph2', Path('.'), diagnosis='nevus', diagnosis_orig='Atypical Nevus')), 'atypical nevus')
test_eq(diagnosis_phrase(Record('a', 'x', Path('.'), diagnosis='nevus', diagnosis_orig='isic2017:seborrheic_keratosis')), 'seborrheic keratosis')
test_eq(diagnosis_phrase(Record('a', 'x', Path('.'))), None)
test_eq(with_article('atypical nevus'), 'an atypical nevus'); test_eq(with_article('melanoma'), 'a melanoma')
test_eq([with_article(f'{n}-year-old') for n in (8, 11, 18, 45, 85)], ['an 8-year-old', 'an 11-year-old', 'an 18-year-old', 'a 45-year-old', 'an 85-year-old'])

# %%
#| export
_PH2_PRESENT = {'streaks': 'streaks', 'regression_areas': 'regression areas', 'blue_whitish_veil': 'a blue-whitish veil'}
_D7_REGRESSION = {'blue areas': 'blue regression areas', 'white areas': 'white regression areas',
                  'combinations': 'blue and white regression areas'}
_D7_VESSELS = {'within regression': 'vessels within regression'}

def _and(items:list)->str: return items[0] if len(items) == 1 else ', '.join(items[:-1]) + ' and ' + items[-1]

@dataclass
class Phrase:
    "One phrase of a caption, with where it came from."
    text:str                    # the words, e.g. 'irregular streaks'
    kind:str                    # 'diagnosis', 'concept', 'morphology' or 'meta'
    source:str                  # provenance: 'label', 'expert', 'crowd', 'predicted', 'measured' or 'metadata'
    key:str=''                  # the concept or measure it states, e.g. 'streaks'
    confidence:float|None=None  # the classifier's probability, for predicted phrases

    def to_dict(self)->dict: return {k: v for k, v in asdict(self).items() if v is not None and v != ''}


# %%
#| export
def concept_phrase_list(rec:Record # a record with expert (PH2, Derm7pt) or crowd (ENHANCE) concepts
                       )->list[Phrase]:
    "The dermoscopic structures present in a record as `Phrase`s (experts before crowd), with their provenance."
    c, out = rec.concepts, []
    add = lambda text, key, src='expert': out.append(Phrase(text, 'concept', src, key))
    net = c.get('pigment_network')
    if net in ('typical', 'atypical'): add(with_article(f'{net} pigment network'), 'pigment_network')
    st = c.get('streaks')
    if st in ('regular', 'irregular'): add(f'{st} streaks', 'streaks')
    dg = c.get('dots_globules', c.get('dots_and_globules'))
    if dg in ('typical', 'regular'): add('regular dots and globules', 'dots_and_globules')
    if dg in ('atypical', 'irregular'): add('irregular dots and globules', 'dots_and_globules')
    pig = c.get('pigmentation')
    if isinstance(pig, str) and pig != 'absent': add(f'{pig} pigmentation', 'pigmentation')
    rs = c.get('regression_structures')
    if rs in _D7_REGRESSION: add(_D7_REGRESSION[rs], 'regression_structures')
    for k, p in _PH2_PRESENT.items():
        if c.get(k) == 'present': add(p, {'regression_areas': 'regression_structures'}.get(k, k))
    vs = c.get('vascular_structures')
    if isinstance(vs, str) and vs != 'absent': add(_D7_VESSELS.get(vs, f'{vs} vessels'), 'vascular_structures')
    if 'asymmetry' in c: add({0: 'a symmetric shape', 1: 'asymmetry in one axis', 2: 'asymmetry in two axes'}[int(c['asymmetry'])], 'asymmetry')
    elif 'crowd_asymmetry' in c and not np.isnan(c['crowd_asymmetry']):
        a = c['crowd_asymmetry']
        if a < .5: add('a symmetric shape', 'asymmetry', 'crowd')
        elif a >= 1.5: add('an asymmetric shape', 'asymmetry', 'crowd')
    if 'crowd_border' in c and not np.isnan(c['crowd_border']):
        b = c['crowd_border']
        if b <= 3: add('a gradual border', 'border_cutoff', 'crowd')
        elif b >= 5: add('an abrupt border cut-off', 'border_cutoff', 'crowd')
    if c.get('colors'): add(f"{_and([x.replace('-', ' ') for x in c['colors']])} colour{'s' if len(c['colors']) > 1 else ''}", 'colours')
    elif 'crowd_color' in c and not np.isnan(c['crowd_color']):
        n = int(round(c['crowd_color']))
        if n >= 1: add(f"{n} colour{'s' if n > 1 else ''}", 'colours', 'crowd')
    return out


# %%
#| export
def concept_phrases(rec:Record # a record with expert (PH2, Derm7pt) or crowd (ENHANCE) concepts
                   )->list[str]:
    "Readable phrases for the dermoscopic structures present in a record, experts before crowd."
    return [p.text for p in concept_phrase_list(rec)]


# %% [markdown]
# Expert vocabularies differ: PH2 says streaks are *present*, Derm7pt that they are *regular* or *irregular*; PH2's
# dots/globules are *typical*/*atypical*, Derm7pt's *regular*/*irregular*. Both become the same phrase where they mean
# the same thing. ENHANCE crowd scores are means of three raters; only clear cases become words (asymmetry
# below 0.5 or from 1.5 on the 0–2 scale, colours rounded). The ENHANCE border score is the ABCD rule's B: the number
# of the 8 border segments where the pigment stops abruptly, so up to 3 is a gradual border and from 5 an abrupt
# cut-off (not the shape's irregularity, which `lesion_morphology` measures).

# %%
ph2 = get_split('ph2', None, ROOT); d7 = get_split('derm7pt', None, ROOT)
r = next(x for x in ph2 if x.concepts['streaks'] == 'present' and x.concepts['blue_whitish_veil'] == 'present')
ph = concept_phrases(r)
assert 'streaks' in ph and 'a blue-whitish veil' in ph and ph[0].endswith('pigment network')
test_eq(concept_phrases(Record('x', 'derm7pt', Path('.'), concepts={'pigment_network': 'absent', 'streaks': 'irregular',
        'dots_and_globules': 'absent', 'pigmentation': 'absent', 'regression_structures': 'combinations',
        'blue_whitish_veil': 'present', 'vascular_structures': 'dotted'})),
        ['irregular streaks', 'blue and white regression areas', 'a blue-whitish veil', 'dotted vessels'])
test_eq(concept_phrases(Record('x', 'isic', Path('.'), concepts={'crowd_asymmetry': 2., 'crowd_border': 6., 'crowd_color': 2.33})),
        ['an asymmetric shape', 'an abrupt border cut-off', '2 colours'])
test_eq(concept_phrases(Record('x', 'isic2019', Path('.'))), [])
test_eq([(p.key, p.source) for p in concept_phrase_list(r)][-1:], [('colours', 'expert')])
test_eq([(p.key, p.source) for p in concept_phrase_list(Record('x', 'isic', Path('.'), concepts={'crowd_border': 6.}))], [('border_cutoff', 'crowd')])

# %%
#| export
_SITES = {'posterior torso': 'the back', 'anterior torso': 'the chest or abdomen', 'lateral torso': 'the side of the torso',
          'lower extremity': 'a leg', 'upper extremity': 'an arm', 'head/neck': 'the head or neck',
          'palms/soles': 'a palm or sole', 'oral/genital': 'the oral or genital area'}

def meta_phrase(rec:Record # a record with meta age / sex / site
               )->str:
    "Where and on whom: 'on the back of a 45-year-old male', 'in a female patient', or ''."
    m = rec.meta; age, sex, site = m.get('age'), m.get('sex'), m.get('site') or m.get('location')
    sex = sex if sex in ('male', 'female') else None
    age = f'{int(age)}-year-old' if isinstance(age, (int, float)) and not np.isnan(age) and age > 0 else None
    who = f'{age} {sex}' if age and sex else f'{age} patient' if age else f'{sex} patient' if sex else None
    where = _SITES.get(site, site) if isinstance(site, str) and site not in ('unknown', '') else None
    if where and who: return f'on {where} of {with_article(who)}'
    if where: return f'on {where}'
    return f'in {with_article(who)}' if who else ''


# %%
test_eq(meta_phrase(Record('x', 's', Path('.'), meta={'age': 45., 'sex': 'male', 'site': 'posterior torso'})), 'on the back of a 45-year-old male')
test_eq(meta_phrase(Record('x', 's', Path('.'), meta={'age': None, 'sex': 'female'})), 'in a female patient')
test_eq(meta_phrase(Record('x', 's', Path('.'), meta={'age': 80., 'sex': 'unknown'})), 'in an 80-year-old patient')
test_eq(meta_phrase(Record('x', 's', Path('.'), meta={'site': 'head/neck', 'sex': None})), 'on the head or neck')
test_eq(meta_phrase(Record('x', 's', Path('.'))), '')


# %%
#| export
def concept_caption(rec:Record, # a labelled record
                    concepts:bool=True, # include the dermoscopic structures
                    meta:bool=True, # include site, age and sex
                    prefix:str='dermoscopy of' # what the caption says the image is
                   )->str:
    "Caption a record from its diagnosis, concepts and metadata, e.g. 'dermoscopy of a melanoma with streaks, on the back of a 45-year-old male'."
    dx = diagnosis_phrase(rec)
    s = f"{prefix} {with_article(dx) if dx else 'a skin lesion'}"
    ph = concept_phrases(rec) if concepts else []
    if ph: s += f' with {_and(ph)}'
    mp = meta_phrase(rec) if meta else ''
    return s + (f', {mp}' if mp else '')


# %% [markdown]
# `concept_caption` is the `caption_fn` for `DermDataset`. Its two switches give the shorter variants that DermCLIP
# also trains on (diagnosis only, diagnosis + concepts, diagnosis + metadata), so short zero-shot prompts such as
# "dermoscopy of a melanoma" are in the training distribution.

# %%
i19 = get_split('isic2019', None, ROOT)
mel = next(x for x in i19 if x.diagnosis == 'melanoma' and x.meta.get('site') == 'posterior torso' and x.meta.get('age') and x.meta.get('sex') == 'male')
test_eq(concept_caption(mel), f"dermoscopy of a melanoma, on the back of a {int(mel.meta['age'])}-year-old male")
test_eq(concept_caption(mel, meta=False), 'dermoscopy of a melanoma')
assert concept_caption(r).startswith(f'dermoscopy of {with_article(r.diagnosis_orig.lower())} with ')
test_eq(concept_caption(Record('x', 's', Path('.'))), 'dermoscopy of a skin lesion')
ds = DermDataset(ph2[:2], size=32, caption_fn=concept_caption)
test_eq(ds[0]['caption'], concept_caption(ph2[0]))
for x in d7[:50]: assert len(concept_caption(x).split()) < 60


# %% [markdown]
# ## Caption variants
#
# Zero-shot prompts are short ("dermoscopy of a melanoma") while full captions are long, so models trained on
# captions also see the shorter variants: diagnosis only, + concepts, + metadata. The full caption comes first.

# %%
#| export
def caption_variants(rec:Record, # a labelled record
                     variants:bool=True # all four variants, or only the full caption
                    )->list[str]:
    "The captions a record trains with: full, diagnosis only, + concepts, + metadata (full first)."
    caps = [concept_caption(rec)]
    if variants: caps += [concept_caption(rec, False, False), concept_caption(rec, True, False), concept_caption(rec, False, True)]
    return caps


# %%
v = caption_variants(r)
test_eq(len(v), 4); test_eq(v[0], concept_caption(r)); test_eq(v[1], f'dermoscopy of {with_article(r.diagnosis_orig.lower())}')
test_eq(caption_variants(r, variants=False), [concept_caption(r)])

# %% [markdown]
# ## Morphology measured from the image and its mask
#
# Most ISIC images have no expert concepts, but every image with a lesion mask (the ground truth, or the project's
# U-Net where there is none) shows its size, shape, border, colours and the skin around it. `lesion_morphology`
# measures them, and `morphology_phrases` turns clear cases into words, with provenance `measured`. The measures
# follow the ABCD rule's definitions; the cut-offs that turn numbers into words are stated with each, and the tests
# below check the measures against what experts (PH2) and the crowd (ENHANCE) said about the same images.
#
# - **Size**: the lesion's share of the image. Dermoscopic images are framed on the lesion, so the share says small,
#   medium or large relative to the field of view: small below `SIZE_BINS[0]`, large from `SIZE_BINS[1]`.
# - **Asymmetry**: reflect the mask across its two principal axes (through the centroid); per axis, the share of lesion
#   pixels whose mirror image is outside the lesion. An axis is asymmetric from `ASYM_CUT`.
# - **Border**: compactness P² / (4πA) of the largest component (1 for a disc, larger for ragged borders): regular up
#   to `BORDER_BINS[0]`, irregular from `BORDER_BINS[1]`.
# - **Colours**: each lesion pixel goes to the nearest of the six dermoscopic colours of the ABCD rule (white, red,
#   light brown, dark brown, blue-gray, black; reference values in CIELAB, `DERM_COLOURS_LAB`) or to the patient's own
#   skin (the median of the surrounding skin); a colour is present from `COLOUR_MIN_SHARE` of the lesion's pixels.
# - **Skin tone**: the individual typology angle ITA° = atan((L* − 50) / b*) of the skin in a ring around the lesion
#   (dark vignette pixels excluded), binned as light (> 41°, Chardon's very light and light), medium (10–41°,
#   intermediate and tan) and dark (< 10°, brown and dark). A dermatoscope's own light shifts ITA, so these are bins of
#   *imaged* skin tone, not a Fitzpatrick type.

# %%
#| export
SIZE_BINS = (0.10, 0.30)          # lesion share of the image: small < 0.10 <= medium < 0.30 <= large
ASYM_CUT = 0.20                   # an axis is asymmetric when this share of lesion pixels mirrors outside the lesion
BORDER_BINS = (1.6, 2.4)          # compactness: regular <= 1.6, irregular >= 2.4 (in between: no phrase)
COLOUR_MIN_SHARE = 0.05           # a colour is present when it covers this share of the lesion
ITA_BINS = (10., 41.)             # ITA°: dark < 10 <= medium <= 41 < light
DERM_COLOURS_LAB = {'white': (90., 0., 2.), 'red': (50., 50., 25.), 'light brown': (55., 15., 30.),
                    'dark brown': (32., 12., 15.), 'blue gray': (45., -2., -12.), 'black': (12., 0., 0.)}


# %%
#| export
def _largest_component(mask:np.ndarray)->np.ndarray:
    lab, n = ndi.label(mask)
    if n <= 1: return mask.astype(bool)
    return lab == (np.argmax(ndi.sum(mask, lab, range(1, n + 1))) + 1)

def _axis_asymmetry(m:np.ndarray)->tuple:
    "Share of lesion pixels whose mirror image across the major / minor principal axis falls outside the lesion."
    ys, xs = np.nonzero(m); cy, cx = ys.mean(), xs.mean()
    cov = np.cov(np.stack([ys - cy, xs - cx])); w, v = np.linalg.eigh(cov); major = v[:, 1]
    out = []
    for axis in (major, np.array([-major[1], major[0]])):      # reflect across the axis: keep the along-axis part
        d = np.stack([ys - cy, xs - cx]); along = axis @ d
        ry, rx = cy + 2 * along * axis[0] - d[0] - 0, cx + 2 * along * axis[1] - d[1]
        ry, rx = np.rint(ry).astype(int), np.rint(rx).astype(int)
        inside = (ry >= 0) & (ry < m.shape[0]) & (rx >= 0) & (rx < m.shape[1])
        hit = np.zeros(len(ys), bool); hit[inside] = m[ry[inside], rx[inside]]
        out.append(float(1 - hit.mean()))
    return tuple(out)

def lesion_morphology(image:Image.Image, # the dermoscopic image (any size)
                      mask:np.ndarray, # its binary lesion mask (H, W), same size
                      work_size:int=256 # measure at this long side (full-size images are downscaled first)
                     )->dict:
    "Size, asymmetry, border compactness, colours, variegation and peri-lesional ITA° of a lesion (None fields if no lesion)."
    im = image.convert('RGB'); mask = np.asarray(mask, bool)
    if (mask.shape[1], mask.shape[0]) != im.size: raise DataError(f"lesion_morphology: mask {mask.shape[::-1]} and image {im.size} differ in size")
    s = work_size / max(im.size)
    if s < 1:
        size = (max(1, round(im.size[0] * s)), max(1, round(im.size[1] * s)))
        im = im.resize(size, Image.BILINEAR); mask = np.asarray(Image.fromarray(mask).resize(size, Image.NEAREST), bool)
    out = {'area_fraction': float(mask.mean())}
    if mask.sum() < 16: return {**out, 'asymmetry_major': None, 'asymmetry_minor': None, 'compactness': None, 'colours': [],
                                'variegation': None, 'ita': None}
    m = _largest_component(mask)
    out['asymmetry_major'], out['asymmetry_minor'] = _axis_asymmetry(m)
    out['compactness'] = float(perimeter(m) ** 2 / (4 * np.pi * m.sum()))
    lab = rgb2lab(np.asarray(im, np.float32) / 255)
    ring = ndi.binary_dilation(mask, iterations=max(2, int(.08 * max(mask.shape)))) & ~mask & (lab[..., 0] > 25)
    skin = np.median(lab[ring], 0) if ring.sum() >= 16 else None
    refs = dict(DERM_COLOURS_LAB, **({'skin': tuple(skin)} if skin is not None else {}))
    names, cents = list(refs), np.array(list(refs.values()))
    px = lab[mask]; near = np.argmin(((px[:, None, :] - cents[None]) ** 2).sum(-1), 1)
    share = np.bincount(near, minlength=len(names)) / len(px)
    out['colours'] = [n for n, f in zip(names, share) if n != 'skin' and f >= COLOUR_MIN_SHARE]
    out['colour_shares'] = {n: round(float(f), 4) for n, f in zip(names, share)}
    out['variegation'] = float(px[:, 1:].std(0).mean())
    out['ita'] = float(np.degrees(np.arctan2(skin[0] - 50, skin[2]))) if skin is not None else None
    return out


# %% [markdown]
# `morphology_phrases` states only clear cases (a measure between the two cut-offs of a word pair says nothing).

# %%
#| export
def size_bin(area_fraction:float # lesion share of the image
            )->str:
    "'small', 'medium' or 'large' by `SIZE_BINS`."
    return 'small' if area_fraction < SIZE_BINS[0] else 'large' if area_fraction >= SIZE_BINS[1] else 'medium'


# %%
#| export
def tone_bin(ita:float|None # ITA° of the skin around the lesion
            )->str|None:
    "'light', 'medium' or 'dark' imaged skin tone by `ITA_BINS` (None when unmeasured)."
    if ita is None or np.isnan(ita): return None
    return 'dark' if ita < ITA_BINS[0] else 'light' if ita > ITA_BINS[1] else 'medium'


# %%
#| export
def morphology_phrases(m:dict # from `lesion_morphology`
                      )->list[Phrase]:
    "Measured phrases: size, asymmetry, border, colours and skin tone (clear cases only), provenance 'measured'."
    P = lambda text, key: Phrase(text, 'morphology', 'measured', key)
    out = [P(f"a {'medium-sized' if size_bin(m['area_fraction']) == 'medium' else size_bin(m['area_fraction'])} lesion", 'size')]
    if m.get('asymmetry_major') is not None:
        n = (m['asymmetry_major'] >= ASYM_CUT) + (m['asymmetry_minor'] >= ASYM_CUT)
        out.append(P({0: 'a symmetric shape', 1: 'asymmetry in one axis', 2: 'asymmetry in two axes'}[int(n)], 'asymmetry'))
    c = m.get('compactness')
    if c is not None and c <= BORDER_BINS[0]: out.append(P('a regular border', 'border'))
    elif c is not None and c >= BORDER_BINS[1]: out.append(P('an irregular border', 'border'))
    if m.get('colours'): out.append(P(f"{_and(m['colours'])} colour{'s' if len(m['colours']) > 1 else ''}", 'colours'))
    t = tone_bin(m.get('ita'))
    if t: out.append(P(f'on {t} skin', 'skin_tone'))
    return out


# %% [markdown]
# On drawn shapes the measures are what geometry says (a disc is symmetric and compact, a lobed ellipse asymmetric, a
# star ragged); on real PH2 cases they agree with the experts' asymmetry and colours, and on ISIC 2017 images with the
# crowd's asymmetry (the numbers are printed, and asserted above chance).

# %%
from scipy.stats import spearmanr
yy, xx = np.mgrid[:96, :128]; disc = (yy - 48) ** 2 + (xx - 64) ** 2 < 30 ** 2
flat = Image.fromarray(np.where(disc[..., None], np.array([90, 55, 40], np.uint8), np.array([215, 170, 150], np.uint8)))
md = lesion_morphology(flat, disc)
assert md['asymmetry_major'] < .05 and md['asymmetry_minor'] < .05 and md['compactness'] < 1.3
test_eq(md['colours'], ['dark brown']); test_eq(size_bin(md['area_fraction']), 'medium'); assert md['ita'] > 10
test_eq([p.key for p in morphology_phrases(md)], ['size', 'asymmetry', 'border', 'colours', 'skin_tone'])
ell = (yy - 48) ** 2 / 20 ** 2 + (xx - 40) ** 2 / 35 ** 2 < 1
lobe = ell | ((yy - 25) ** 2 + (xx - 75) ** 2 < 20 ** 2)                      # an ellipse with a big lobe: asymmetric
assert max(lesion_morphology(flat, lobe)[k] for k in ('asymmetry_major', 'asymmetry_minor')) > ASYM_CUT
test_fail(lambda: lesion_morphology(flat, disc[:50]), contains='differ in size')
from dermnb.core import load_image, load_mask
ph2m = [(x, lesion_morphology(load_image(x.image), load_mask(x.mask))) for x in ph2[:60]]
n_axes = [(m['asymmetry_major'] >= ASYM_CUT) + (m['asymmetry_minor'] >= ASYM_CUT) for _, m in ph2m]
rho_a = spearmanr([x.concepts['asymmetry'] for x, _ in ph2m], n_axes)[0]
col_agree = np.mean([[(c in m['colours']) == (c.replace(' ', '-') in x.concepts['colors']) for c in DERM_COLOURS_LAB] for x, m in ph2m])
print(f"PH2 (n=60): asymmetry axes vs expert Spearman {rho_a:.2f}; colour presence agrees with the experts on {col_agree:.0%} of (image, colour) pairs")
assert rho_a > .2 and col_agree > .6
isic_a = [x for x in get_split('isic2018_task1', 'train', ROOT) if 'crowd_asymmetry' in x.concepts][:60]
am = [lesion_morphology(load_image(x.image), load_mask(x.mask)) for x in isic_a]
rho_c = spearmanr([x.concepts['crowd_asymmetry'] for x in isic_a], [m['asymmetry_major'] + m['asymmetry_minor'] for m in am])[0]
print(f"ISIC 2017 (n=60): measured asymmetry vs ENHANCE crowd asymmetry, Spearman {rho_c:.2f}"); assert rho_c > .2
ang = np.arctan2(yy - 48, xx - 64); star = np.hypot(yy - 48, xx - 64) < 24 + 10 * np.cos(7 * ang)
assert lesion_morphology(flat, star)['compactness'] > BORDER_BINS[1] > md['compactness']

# %% [markdown]
# ## Concept-rich captions with provenance (LesionGen)
#
# A LesionGen caption says what the experts, the crowd, a concept classifier and the measurements say about one
# image, and keeps, per phrase, where it came from. `caption_phrases` gathers them in priority order: the diagnosis
# (the label), expert and crowd concepts, concepts *predicted* by a classifier (only those a caller passes, which is
# where a confidence threshold applies), measured morphology, then site, age and sex. Each concept is said once: a
# measured asymmetry is dropped when an expert rated it.

# %%
#| export
SOURCE_PRIORITY = ('label', 'expert', 'crowd', 'predicted', 'measured', 'metadata')

def caption_phrases(rec:Record, # the record
                    predicted:Sequence[Phrase]=(), # phrases from a concept classifier (provenance 'predicted', with confidence)
                    measured:dict|None=None # `lesion_morphology` of the record's image and mask
                   )->list[Phrase]:
    "Every phrase a caption of `rec` may use, in priority order (diagnosis, expert, crowd, predicted, measured, meta)."
    dx = diagnosis_phrase(rec)
    out = [Phrase(with_article(dx) if dx else 'a skin lesion', 'diagnosis', 'label' if dx else 'metadata', 'diagnosis')]
    out += concept_phrase_list(rec)
    out += sorted(predicted, key=lambda p: -(p.confidence or 0))
    if measured: out += morphology_phrases(measured)
    mp = meta_phrase(rec)
    if mp: out.append(Phrase(mp, 'meta', 'metadata', 'meta'))
    seen, keep = set(), []
    for p in out:                               # one phrase per key, the most authoritative source first
        k = {'asymmetry': 'asymmetry', 'colours': 'colours'}.get(p.key, p.key + ':' + p.text if p.kind == 'concept' else p.key)
        if k in seen: continue
        seen.add(k); keep.append(p)
    return keep


# %% [markdown]
# The wording varies through templates, chosen per image by a hash of its id and the seed (so a caption is
# deterministic given the seed and differs between seeds). Captions must fit the text encoder: the base model's MiniLM
# reads 40 tokens (`dermnb.diffusion.load_minilm`), including its two special tokens. `fit_caption` renders the
# phrases with a template and, while the caption is too long, drops the lowest-priority phrase (the diagnosis is never
# dropped); what was dropped is recorded.

# %%
#| export
CAPTION_TEMPLATES = ('dermoscopy of {dx}{with}{meta}', 'dermoscopy of {dx}{showing}{meta}', 'a dermoscopic image of {dx}{with}{meta}',
                     'dermoscopy of {dx}{colon}{meta}')
CAPTION_MAX_TOKENS = 40             # MiniLM tokens the base model's text encoder reads, [CLS] and [SEP] included

@functools.lru_cache(maxsize=1)
def caption_tokenizer():
    "The base model's text tokenizer (MiniLM, from the installed package), for counting caption tokens."
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(minilm_dir())


# %%
#| export
def _template_index(rec_id:str, seed:int, n:int)->int:
    return int(hashlib.sha256(f'{rec_id}:{seed}'.encode()).hexdigest(), 16) % n

def render_caption(phrases:Sequence[Phrase], # from `caption_phrases`, diagnosis first
                   template:str=CAPTION_TEMPLATES[0] # one of `CAPTION_TEMPLATES`
                  )->str:
    "Phrases rendered with a template: diagnosis, then concepts and morphology, then site/age/sex."
    dx = phrases[0].text
    body = [p.text for p in phrases[1:] if p.kind != 'meta']
    meta = next((p.text for p in phrases if p.kind == 'meta'), '')
    skin = [b for b in body if b.startswith('on ') and b.endswith(' skin')]
    body = [b for b in body if b not in skin]
    parts = {'with': f' with {_and(body)}' if body else '', 'showing': f' showing {_and(body)}' if body else '',
             'colon': f': {", ".join(body)}' if body else ''}
    s = template.format(dx=dx, meta='', **parts)
    if skin: s += f', {skin[0]}'
    return s + (f', {meta}' if meta else '')


# %%
#| export
def fit_caption(rec:Record, # the record
                phrases:Sequence[Phrase], # from `caption_phrases`
                seed:int=0, # picks the template (with the record id)
                max_tokens:int=CAPTION_MAX_TOKENS, # the text encoder's token limit
                tokenizer=None # counts tokens; default `caption_tokenizer()`
               )->dict:
    "A caption that fits the token limit: {'id', 'source', 'caption', 'phrases', 'dropped', 'tokens', 'template'}."
    tok = tokenizer or caption_tokenizer()
    t = _template_index(rec.id, seed, len(CAPTION_TEMPLATES))
    keep = list(phrases)
    order = sorted(range(1, len(keep)), key=lambda i: (SOURCE_PRIORITY.index(keep[i].source), i))   # drop from the end
    dropped = []
    while True:
        cap = render_caption(keep, CAPTION_TEMPLATES[t]); n = len(tok(cap).input_ids)
        if n <= max_tokens or len(keep) == 1: break
        worst = max(range(1, len(keep)), key=lambda i: (SOURCE_PRIORITY.index(keep[i].source), i))
        dropped.append(keep.pop(worst))
    return {'id': rec.id, 'source': rec.source, 'caption': cap, 'phrases': [p.to_dict() for p in keep],
            'dropped': [p.to_dict() for p in dropped], 'tokens': n, 'template': t}


# %%
#| export
def label_caption(rec:Record # the record
                 )->str:
    "The label-only caption ('dermoscopy of a melanoma'): the baseline of LesionGen's ablation."
    return concept_caption(rec, concepts=False, meta=False)


# %% [markdown]
# A PH2 case with streaks and a veil keeps its expert phrases and gains measured ones; wording is deterministic per
# seed; long captions are cut to the limit by dropping metadata and measurements before expert concepts; and a
# record without any annotation still gets a caption from its measured morphology.

# %%
m_r = lesion_morphology(load_image(r.image), load_mask(r.mask))
ph_r = caption_phrases(r, measured=m_r)
test_eq(ph_r[0].kind, 'diagnosis'); assert {'expert', 'measured'} <= {p.source for p in ph_r}
assert 'asymmetry' not in [p.key for p in ph_r if p.source == 'measured']           # the expert's asymmetry wins
c0, c1 = fit_caption(r, ph_r, seed=0), fit_caption(r, ph_r, seed=0)
test_eq(c0, c1); assert c0['tokens'] <= CAPTION_MAX_TOKENS and 'streaks' in c0['caption']
assert len({fit_caption(r, ph_r, seed=s)['template'] for s in range(12)}) > 1       # the wording varies with the seed
tight = fit_caption(r, ph_r, max_tokens=16)
assert tight['tokens'] <= 16 and tight['dropped'] and tight['dropped'][0]['source'] in ('metadata', 'measured')
bare = Record('x', 'isic2019', r.image)
cb = fit_caption(bare, caption_phrases(bare, measured=m_r))
assert cb['caption'].startswith(('dermoscopy of a skin lesion', 'a dermoscopic image of a skin lesion')) and 'lesion' in cb['caption']
assert all(p['source'] in ('metadata', 'measured') for p in cb['phrases'])
test_eq(label_caption(r), f'dermoscopy of {with_article(r.diagnosis_orig.lower())}')
print(c0['caption'], '|', [(p['text'], p['source']) for p in c0['phrases']])
