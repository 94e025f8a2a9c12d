"""Where Δh goes: Asyrp's bottleneck (the mid-block, 128×4×4 here) or the first up-block's output (128×8×8, the
spatial size of Asyrp's own h at 256 px). Measured on the *validation* split, so the figure's test split stays unused.

Each method's editor is trained (or read from the cache) with `h_block` = 'mid_block' and 'up_blocks.0', same
config otherwise, and edits the same validation images, 16 per edit in its source state, with Asyrp's quality
boosting (the figure's sampler) and without it; the mid-block editor also with Δh = 0, the pipeline's own floor.
Prints S_dir (with its SE), NS-LPIPS, segmentation consistency, diagnosis kept, 'add' detection and detection after
'remove' per setting.

    DERMNB_DATA=../shared/dermdata python benchmarks/cpde_h_block.py [--methods asyrp cpde]

Measured with the editors' 20-step DDIM schedule of the time (`steps=20` pins it; the editors now default to 40,
see benchmarks/cpde_steps.py).
"""
import argparse, dataclasses, time
import torch
from _results import save_results

if __name__ == '__main__':
    ap = argparse.ArgumentParser(); ap.add_argument('--methods', nargs='+', default=['asyrp', 'cpde']); a = ap.parse_args()
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
        for block in ('mid_block', 'up_blocks.0'):
            ed, cfg, conds, bb, clip = load_editor(method, 'quick', root, dev, 'unet', progress=False, h_block=block, steps=20)
            inv = cached_inversion(bb, sub, cfg.steps)
            for boost in (True, False):
                c = dataclasses.replace(cfg, t_addnoise=cfg.t_addnoise if boost else 0)
                for strength in ((1., 0.) if block == 'mid_block' else (1.,)):
                    m = edit_metrics(sub.images, apply_editor(bb, ed, c, sub, inv, eidx, conds, seed=0, strength=strength),
                                     sub.masks, edits_of, clip, judge, dxh, useg, dev)
                    add, rem = m[m.direction == 'add'], m[m.direction == 'remove']
                    rows.append({'method': method, 'h_block': block, 'quality_boost': boost, 'strength': strength, 'n': len(m),
                                 's_dir': m.s_dir.mean(), 's_dir_se': m.s_dir.std() / len(m) ** .5, 'ns_lpips': m.ns_lpips.mean(),
                                 'seg_dice': m.seg_dice.mean(), 'dx_kept': m.dx_kept.mean(), 'add_detected_before': add.detected_before.mean(),
                                 'add_detected_after': add.detected_after.mean(), 'remove_detected_after': rem.detected_after.mean()})
                    print({k: (round(float(v), 4) if isinstance(v, float) else v) for k, v in rows[-1].items()}, f'{time.time() - t0:.0f} s', flush=True)
    save_results(rows, 'cpde_h_block')
