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
from _results import save_results
from _cpde import edit_bench, summary, show

if __name__ == '__main__':
    ap = argparse.ArgumentParser(); ap.add_argument('--methods', nargs='+', default=['cpde', 'asyrp']); a = ap.parse_args()
    from dermnb.cpde import load_editor, cached_inversion, apply_editor, edit_schedule
    t0 = time.time(); b = edit_bench('train', 101)
    rows = []
    for method in a.methods:
        ed, cfg, conds, bb, clip = load_editor(method, 'quick', None, b.device, 'unet', progress=False, steps=20)
        t_rule = edit_schedule(bb, b.split_set, clip)['t_addnoise']; inv = cached_inversion(bb, b.sub, cfg.steps)
        for boost in (True, False):
            c = dataclasses.replace(cfg, t_addnoise=t_rule if boost else 0)
            for strength in (1., 0.):
                m = b.score(apply_editor(bb, ed, c, b.sub, inv, b.eidx, conds, seed=0, strength=strength), clip)
                rows.append({'method': method, 'strength': strength, 'quality_boost': boost, 't_addnoise': c.t_addnoise, **summary(m)})
                show(rows[-1], t0)
    save_results(rows, 'cpde_quality_boost')
