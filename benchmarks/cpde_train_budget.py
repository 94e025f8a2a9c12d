"""The h-space editors' training budget: can the cpde figure train its four editors on half the pairs?

The editors are the largest part of the cpde figure's time from an empty cache (four editors, about 116 s each on 2
cores; the figure's stage times are in figures/cpde/timings_empty_cache.csv; target 720 s). One optimizer step per timestep above t_edit and per batch of 8 pairs, so halving the
pairs per edit (8 -> 4) halves the training time. Each method's editor is trained (or read from the cache) both ways,
same config otherwise, and edits the same 160 *validation* pairs (16 per edit, source state) with the figure's sampler.
Prints training seconds, S_dir (with its SE), NS-LPIPS, segmentation consistency, diagnosis kept and concept detection
after 'add' / 'remove' per setting.

    DERMNB_DATA=../shared/dermdata python benchmarks/cpde_train_budget.py [--methods asyrp masking sct cpde] [--pairs 8 4]
"""
import argparse, time
import pandas as pd, torch
from _results import save_results
from _cpde import edit_bench, summary, show

if __name__ == '__main__':
    ap = argparse.ArgumentParser(); ap.add_argument('--methods', nargs='+', default=['asyrp', 'masking', 'sct', 'cpde'])
    ap.add_argument('--pairs', nargs='+', type=int, default=[8, 4]); a = ap.parse_args()
    torch.set_num_threads(2)
    from dermnb.cpde import load_editor, cached_inversion, apply_editor
    t0 = time.time(); b = edit_bench('val', 202)
    rows = []
    for method in a.methods:
        for per_edit in a.pairs:
            ed, cfg, conds, bb, clip = load_editor(method, 'quick', None, b.device, 'unet', progress=False, pairs_per_edit=per_edit)
            h = pd.read_csv(ed.cache_dir/'history.csv')
            m = b.score(apply_editor(bb, ed, cfg, b.sub, cached_inversion(bb, b.sub, cfg.steps), b.eidx, conds, seed=0), clip)
            rows.append({'method': method, 'pairs_per_edit': per_edit, 'optimizer_steps': len(h), 'train_s': h.seconds.iloc[0], **summary(m)})
            show(rows[-1], t0)
    save_results(rows, 'cpde_train_budget')
