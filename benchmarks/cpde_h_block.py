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
from _cpde import edit_bench, summary, show

if __name__ == '__main__':
    ap = argparse.ArgumentParser(); ap.add_argument('--methods', nargs='+', default=['asyrp', 'cpde']); a = ap.parse_args()
    torch.set_num_threads(2)
    from dermnb.cpde import load_editor, cached_inversion, apply_editor
    t0 = time.time(); b = edit_bench('val', 202)
    rows = []
    for method in a.methods:
        for block in ('mid_block', 'up_blocks.0'):
            ed, cfg, conds, bb, clip = load_editor(method, 'quick', None, b.device, 'unet', progress=False, h_block=block, steps=20)
            inv = cached_inversion(bb, b.sub, cfg.steps)
            for boost in (True, False):
                c = dataclasses.replace(cfg, t_addnoise=cfg.t_addnoise if boost else 0)
                for strength in ((1., 0.) if block == 'mid_block' else (1.,)):
                    m = b.score(apply_editor(bb, ed, c, b.sub, inv, b.eidx, conds, seed=0, strength=strength), clip)
                    rows.append({'method': method, 'h_block': block, 'quality_boost': boost, 'strength': strength, **summary(m)})
                    show(rows[-1], t0)
    save_results(rows, 'cpde_h_block')
