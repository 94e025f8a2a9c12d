"""Asyrp's quality boosting (η = 1 below t_addnoise) on our backbone: does it help or hurt? Measured on the *training* split.

The same trained editors (CPDE and Asyrp; training does not depend on t_addnoise) edit the same training images,
16 per edit in its source state, sampled with the rule's t_addnoise (η = 1 below it, as Asyrp's code does) and with
t_addnoise = 0 (η = 0 throughout), with the edit and without it (Δh = 0). Prints S_dir, NS-LPIPS, segmentation
consistency (U-Net Dice vs the lesion mask), diagnosis kept and 'add' detection per setting.

    DERMNB_DATA=../shared/dermdata python benchmarks/cpde_quality_boost.py [--methods cpde asyrp]

Measured with the editors' 20-step DDIM schedule of the time (`steps=20` pins it; the editors now default to 40,
see benchmarks/cpde_steps.py).
"""
import argparse, dataclasses, time
import pandas as pd, torch
from _results import save_results

if __name__ == '__main__':
    ap = argparse.ArgumentParser(); ap.add_argument('--methods', nargs='+', default=['cpde', 'asyrp']); a = ap.parse_args()
    from dermnb.core import data_root
    from dermnb.segmenter import load_segmenter, SegmenterConfig
    from dermnb.lesiongen import load_concept_classifier
    from dermnb.cpde import (ALL_EDITS, cpde_images, load_editor, cached_inversion, apply_editor, source_pairs, edit_metrics,
                             diagnosis_head, edit_schedule)
    root, dev = data_root(), 'cpu'; t0 = time.time()
    train = cpde_images('train', 'unet', 'quick', root, dev)
    pairs = source_pairs(train, list(ALL_EDITS), 16, 101)
    idx = [i for i, _ in pairs]; eidx = torch.tensor([e for _, e in pairs]); sub = train.subset(idx)
    judge, dxh = load_concept_classifier(root=root), diagnosis_head(root)
    useg = load_segmenter(SegmenterConfig.for_profile('quick'), root, dev); edits_of = [ALL_EDITS[j] for j in eidx.tolist()]
    rows = []
    for method in a.methods:
        ed, cfg, conds, bb, clip = load_editor(method, 'quick', root, dev, 'unet', progress=False, steps=20)
        t_rule = edit_schedule(bb, train, clip)['t_addnoise']; inv = cached_inversion(bb, sub, cfg.steps)
        for boost in (True, False):
            c = dataclasses.replace(cfg, t_addnoise=t_rule if boost else 0)
            for strength in (1., 0.):
                m = edit_metrics(sub.images, apply_editor(bb, ed, c, sub, inv, eidx, conds, seed=0, strength=strength),
                                 sub.masks, edits_of, clip, judge, dxh, useg, dev)
                add = m[m.direction == 'add']
                rows.append({'method': method, 'strength': strength, 'quality_boost': boost, 't_addnoise': c.t_addnoise, 'n': len(m),
                             's_dir': m.s_dir.mean(), 'ns_lpips': m.ns_lpips.mean(), 'seg_dice': m.seg_dice.mean(),
                             'dx_kept': m.dx_kept.mean(), 'add_detected_before': add.detected_before.mean(),
                             'add_detected_after': add.detected_after.mean()})
                print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in rows[-1].items()}, f'{time.time() - t0:.0f} s', flush=True)
    save_results(rows, 'cpde_quality_boost')
