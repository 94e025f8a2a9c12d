"""CPDE's loss weights, CLIP view and sampling strength, chosen on the *validation* split (the figure's test split stays unused).

CPDE's mask-guided dual branch keeps Asyrp's weights (clip_loss_w 1, l1_loss_w 3), but its L1 counts only outside the
lesion, where background blending and the pixel composite already keep the context; its CLIP term sees only the lesion.
This trains the CPDE editor with a larger CLIP weight, without the L1 term, or with CLIP seeing a crop around the lesion
(`clip_view='crop'`) instead of the composited whole image, same config otherwise, and edits the same 160 validation
pairs (16 per edit, source state) with the figure's sampler, at Δh strength 1 and 2 (Asyrp's `hs_coeff_delta_h`),
with Asyrp's editor as the reference; Asyrp and CPDE also at strength 0, each pipeline's own reconstruction floor. Prints S_dir (with its SE), NS-LPIPS, segmentation
consistency, diagnosis kept and concept detection after 'add' / 'remove' per setting.

    DERMNB_DATA=../shared/dermdata python benchmarks/cpde_loss_weights.py [--weights 1,3 3,3 10,3 1,0] [--crop 1,3]
"""
import argparse, time
import torch
from _results import save_results
from _cpde import edit_bench, summary, show

if __name__ == '__main__':
    ap = argparse.ArgumentParser(); ap.add_argument('--weights', nargs='+', default=['1,3', '3,3', '10,3', '1,0'])
    ap.add_argument('--crop', nargs='*', default=['1,3'], help='weights trained with the crop view')
    ap.add_argument('--strengths', nargs='+', type=float, default=[1., 2.]); a = ap.parse_args()
    torch.set_num_threads(2)
    from dermnb.cpde import load_editor, cached_inversion, apply_editor
    t0 = time.time(); b = edit_bench('val', 202)
    rows = []
    w = lambda s: tuple(map(float, s.split(',')))
    runs = [('asyrp', 1., 3., 'mask')] + [('cpde', *w(s), 'mask') for s in a.weights] + [('cpde', *w(s), 'crop') for s in a.crop]
    for method, w_clip, w_l1, view in runs:
        ed, cfg, conds, bb, clip = load_editor(method, 'quick', None, b.device, 'unet', progress=False, w_clip=w_clip, w_l1=w_l1, clip_view=view)
        inv = cached_inversion(bb, b.sub, cfg.steps)
        floor = (0.,) if (method, w_clip, w_l1, view) in (('asyrp', 1., 3., 'mask'), ('cpde', 1., 3., 'mask')) else ()
        for strength in floor + ((1.,) if method == 'asyrp' else tuple(a.strengths)):
            m = b.score(apply_editor(bb, ed, cfg, b.sub, inv, b.eidx, conds, seed=0, strength=strength), clip)
            rows.append({'method': method, 'w_clip': w_clip, 'w_l1': w_l1, 'clip_view': view, 'strength': strength, **summary(m)})
            show(rows[-1], t0)
    save_results(rows, 'cpde_loss_weights')
