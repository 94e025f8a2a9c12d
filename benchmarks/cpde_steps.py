"""The h-space editors' DDIM schedule: the base model's 20-step sampling grid or Asyrp's official 40 steps
(n_inv_step = n_train_step = n_test_step = 40). Measured on the *validation* split, so the figure's test split stays unused.

Each method's editor is trained (or read from the cache) at 20 and at 40 steps, same config otherwise, and edits
the same 160 validation pairs (16 per edit, source state) with the figure's sampler (Asyrp's quality boosting on);
CPDE also with Δh = 0, the pipeline's reconstruction floor. Prints S_dir (with its SE), NS-LPIPS, segmentation
consistency, diagnosis kept and concept detection after 'add' / 'remove' per setting.

    DERMNB_DATA=../shared/dermdata python benchmarks/cpde_steps.py [--methods asyrp masking sct cpde]
"""
import argparse, time
import torch
from _results import save_results

if __name__ == '__main__':
    ap = argparse.ArgumentParser(); ap.add_argument('--methods', nargs='+', default=['asyrp', 'masking', 'sct', 'cpde']); a = ap.parse_args()
    torch.set_num_threads(2)
    from dermnb.core import data_root
    from dermnb.segmenter import load_segmenter, SegmenterConfig
    from dermnb.lesiongen import load_concept_classifier
    from dermnb.cpde import ALL_EDITS, cpde_images, load_editor, cached_inversion, apply_editor, source_pairs, edit_metrics, diagnosis_head
    root, dev = data_root(), 'cpu'; t0 = time.time()
    val = cpde_images('val', 'unet', 'quick', root, dev)
    pairs = source_pairs(val, list(ALL_EDITS), 16, 202)
    idx = [i for i, _ in pairs]; eidx = torch.tensor([e for _, e in pairs]); sub = val.subset(idx)
    judge, dxh = load_concept_classifier(root=root), diagnosis_head(root)
    useg = load_segmenter(SegmenterConfig.for_profile('quick'), root, dev); edits_of = [ALL_EDITS[j] for j in eidx.tolist()]
    rows = []
    for method in a.methods:
        for steps in (20, 40):
            ed, cfg, conds, bb, clip = load_editor(method, 'quick', root, dev, 'unet', progress=False, steps=steps)
            inv = cached_inversion(bb, sub, steps)
            for strength in ((1., 0.) if method == 'cpde' else (1.,)):
                m = edit_metrics(sub.images, apply_editor(bb, ed, cfg, sub, inv, eidx, conds, seed=0, strength=strength),
                                 sub.masks, edits_of, clip, judge, dxh, useg, dev)
                add, rem = m[m.direction == 'add'], m[m.direction == 'remove']
                rows.append({'method': method, 'steps': steps, 'strength': strength, 'optimizer_steps': len(__import__('pandas').read_csv(ed.cache_dir/'history.csv')),
                             'n': len(m), 's_dir': m.s_dir.mean(), 's_dir_se': m.s_dir.std() / len(m) ** .5, 'ns_lpips': m.ns_lpips.mean(),
                             'seg_dice': m.seg_dice.mean(), 'dx_kept': m.dx_kept.mean(), 'add_detected_before': add.detected_before.mean(),
                             'add_detected_after': add.detected_after.mean(), 'remove_detected_after': rem.detected_after.mean()})
                print({k: (round(float(v), 4) if isinstance(v, float) else v) for k, v in rows[-1].items()}, f'{time.time() - t0:.0f} s', flush=True)
    save_results(rows, 'cpde_steps')
