"""The h-space editors' DDIM schedule: the base model's 20-step sampling grid or Asyrp's official 40 steps
(n_inv_step = n_train_step = n_test_step = 40). Measured on the *validation* split, so the figure's test split stays unused.

Each method's editor is trained (or read from the cache) at 20 and at 40 steps, same config otherwise, and edits
the same 160 validation pairs (16 per edit, source state) with the figure's sampler (Asyrp's quality boosting on);
CPDE also with Δh = 0, the pipeline's reconstruction floor. Prints S_dir (with its SE), NS-LPIPS, segmentation
consistency, diagnosis kept and concept detection after 'add' / 'remove' per setting.

    DERMNB_DATA=../shared/dermdata python benchmarks/cpde_steps.py [--methods asyrp masking sct cpde]
"""
import argparse, time
import pandas as pd, torch
from _results import save_results
from _cpde import edit_bench, summary, show

if __name__ == '__main__':
    ap = argparse.ArgumentParser(); ap.add_argument('--methods', nargs='+', default=['asyrp', 'masking', 'sct', 'cpde']); a = ap.parse_args()
    torch.set_num_threads(2)
    from dermnb.cpde import load_editor, cached_inversion, apply_editor
    t0 = time.time(); b = edit_bench('val', 202)
    rows = []
    for method in a.methods:
        for steps in (20, 40):
            ed, cfg, conds, bb, clip = load_editor(method, 'quick', None, b.device, 'unet', progress=False, steps=steps)
            inv = cached_inversion(bb, b.sub, steps)
            for strength in ((1., 0.) if method == 'cpde' else (1.,)):
                m = b.score(apply_editor(bb, ed, cfg, b.sub, inv, b.eidx, conds, seed=0, strength=strength), clip)
                rows.append({'method': method, 'steps': steps, 'strength': strength,
                             'optimizer_steps': len(pd.read_csv(ed.cache_dir/'history.csv')), **summary(m)})
                show(rows[-1], t0)
    save_results(rows, 'cpde_steps')
