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
import re
from pathlib import Path
import numpy as np
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

def concept_phrases(rec:Record # a record with expert (PH2, Derm7pt) or crowd (ENHANCE) concepts
                   )->list[str]:
    "Readable phrases for the dermoscopic structures present in a record, experts before crowd."
    c, out = rec.concepts, []
    net = c.get('pigment_network')
    if net in ('typical', 'atypical'): out.append(with_article(f'{net} pigment network'))
    st = c.get('streaks')
    if st in ('regular', 'irregular'): out.append(f'{st} streaks')
    dg = c.get('dots_globules', c.get('dots_and_globules'))
    if dg in ('typical', 'regular'): out.append('regular dots and globules')
    if dg in ('atypical', 'irregular'): out.append('irregular dots and globules')
    pig = c.get('pigmentation')
    if isinstance(pig, str) and pig != 'absent': out.append(f'{pig} pigmentation')
    rs = c.get('regression_structures')
    if rs in _D7_REGRESSION: out.append(_D7_REGRESSION[rs])
    out += [p for k, p in _PH2_PRESENT.items() if c.get(k) == 'present']
    vs = c.get('vascular_structures')
    if isinstance(vs, str) and vs != 'absent': out.append(_D7_VESSELS.get(vs, f'{vs} vessels'))
    if 'asymmetry' in c: out.append({0: 'a symmetric shape', 1: 'asymmetry in one axis', 2: 'asymmetry in two axes'}[int(c['asymmetry'])])
    elif 'crowd_asymmetry' in c and not np.isnan(c['crowd_asymmetry']):
        a = c['crowd_asymmetry']; out += ['a symmetric shape'] if a < .5 else ['an asymmetric shape'] if a >= 1.5 else []
    if 'crowd_border' in c and not np.isnan(c['crowd_border']):
        b = c['crowd_border']; out += ['a regular border'] if b <= 3 else ['an irregular border'] if b >= 5 else []
    if c.get('colors'): out.append(f"{_and([x.replace('-', ' ') for x in c['colors']])} colour{'s' if len(c['colors']) > 1 else ''}")
    elif 'crowd_color' in c and not np.isnan(c['crowd_color']):
        n = int(round(c['crowd_color'])); out += [f"{n} colour{'s' if n > 1 else ''}"] if n >= 1 else []
    return out


# %% [markdown]
# Expert vocabularies differ: PH2 says streaks are *present*, Derm7pt that they are *regular* or *irregular*; PH2's
# dots/globules are *typical*/*atypical*, Derm7pt's *regular*/*irregular*. Both become the same phrase where they mean
# the same thing. ENHANCE crowd scores are means of three raters; only clear cases become words (asymmetry
# below 0.5 or from 1.5 on the 0–2 scale, border up to 3 or from 5 of 8 segments, colours rounded).

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
        ['an asymmetric shape', 'an irregular border', '2 colours'])
test_eq(concept_phrases(Record('x', 'isic2019', Path('.'))), [])

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
