"""How many synthetic pairs should a SkinDualGen augmentation arm add? 1× or 3× the real pairs, at 10% real data.

The figure adds as many synthetic pairs as real ones. Here the real-only arm is set against 1× and 3× synthetic pairs
(the figure's model, prompts from ISIC 2018 training captions, g = 2, 20 steps, flagged pairs dropped; a pool the
figure does not use), each arm trained as the figure trains it (`aug_seg_arm`, 200 steps, 3 seeds) and scored on the
ISIC 2018 *validation* split. Prints Dice and the gain over real only per seed, mean and std.

    DERMNB_DATA=../shared/dermdata python benchmarks/skindualgen_synthetic_ratio.py [--ratios 1 3] [--fraction 0.1]
"""
import argparse, time
import numpy as np, pandas as pd, torch
from dermnb.core import data_root
from dermnb.data import get_split, DermDataset
from dermnb.lesiongen import CaptionConfig, caption_dataset
from dermnb.skindualgen import load_skindualgen, generate_pairs, mask_flag, AugSegConfig, aug_seg_arm
from _results import save_results

ap = argparse.ArgumentParser()
ap.add_argument('--ratios', type=int, nargs='+', default=[1, 3])
ap.add_argument('--fraction', type=float, default=.1)
ap.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
a = ap.parse_args()
root = data_root(); rows = caption_dataset(CaptionConfig(), root, 'cpu', progress=False)
bb = load_skindualgen('quick', root=root, device='cpu', progress=False)
train_pairs = DermDataset(get_split('isic2018_task1', 'train', root), 64, 'squash', in_memory=True)
val_pairs = DermDataset(get_split('isic2018_task1', 'val', root), 64, 'squash', in_memory=True)
n_real = int(round(a.fraction * len(train_pairs)))
tr = [r for r in rows if r['source'] == 'isic2018_task1']
prompts = [tr[k]['caption'] for k in np.random.default_rng(7).integers(len(tr), size=int(max(a.ratios) * n_real * 1.17))]
t0 = time.time(); si, sm = generate_pairs(bb, prompts, 2., 20, 777)
keep = torch.tensor([mask_flag(m) == '' for m in sm.numpy()]); si, sm = si[keep], sm[keep]
print(f'pool {len(si)} unflagged pairs of {len(keep)}, {time.time() - t0:.0f} s', flush=True)
res = []
for s in a.seeds:
    for k in [0] + [r * n_real for r in a.ratios]:
        r = aug_seg_arm(AugSegConfig(steps=200, fraction=a.fraction, synthetic=min(k, len(si)), seed=s), train_pairs, val_pairs, si, sm, cache=False)
        res.append({'seed': s, 'n_real': n_real, 'synthetic': min(k, len(si)), 'ratio': k // n_real, 'dice': r['dice'], 'iou': r['iou'],
                    'n_val': len(val_pairs), 'pool': len(si)})
        print(res[-1], flush=True)
df = pd.DataFrame(res); df['gain'] = df.dice - df.seed.map(df[df.ratio == 0].set_index('seed').dice)
print(df.groupby('ratio')[['dice', 'gain']].agg(['mean', 'std']).round(4).to_string())
save_results(df, 'skindualgen_synthetic_ratio')
