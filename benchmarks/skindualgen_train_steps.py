"""Does SkinDualGen's image-mask consistency grow with training? The figure's model (1200 steps) against longer runs.

Consistency falls short on small lesions, where the generated image shows a halo the U-Net reads as lesion: an image
quality limit, so the lever is training. Each run trains the figure's config (with the mask-shape loss) for `--steps`
optimizer steps (everything else equal, cached by config) and is scored by the figure's consistency protocol on
prompts from the ISIC 2018 *validation* captions (class-balanced over melanoma / nevus / seborrheic keratosis, g = 2,
20 steps), so the choice is not made on the test captions the figure uses. Prints mean Dice overall and under 10% lesion
area, and the training time.

    DERMNB_DATA=../shared/dermdata python benchmarks/skindualgen_train_steps.py [--steps 1200 2400] [--n 126]
"""
import argparse, json, time
import pandas as pd
from dermnb.core import data_root
from dermnb.lesiongen import CaptionConfig, caption_dataset
from dermnb.segmenter import load_segmenter, SegmenterConfig
from dermnb.training import train_cached, load_trained
from dermnb.base import load_base_model
from dermnb.skindualgen import skindualgen_train_config, skindualgen_loss, pair_training_set, generate_pairs, consistency
from _results import save_results

ap = argparse.ArgumentParser()
ap.add_argument('--steps', type=int, nargs='+', default=[1200, 2400])
ap.add_argument('--n', type=int, default=126)
ap.add_argument('--seed', type=int, default=1)
a = ap.parse_args()
root = data_root(); load_base_model('quick', root, 0, 'cpu', False)
val_rows = caption_dataset(CaptionConfig(datasets=('isic2018_task1',), splits=('val',)), root, 'cpu', progress=False)
dx = {'melanoma': 'melanoma', 'nevus': 'nevus', 'benign_keratosis': 'seborrheic keratosis'}
by_class = {c: [r['caption'] for r in val_rows if dx.get(r['diagnosis']) == c] for c in dx.values()}
prompts = [p for c in by_class for p in (by_class[c] * 20)[:a.n // 3]]
unet = load_segmenter(SegmenterConfig.for_profile('quick'), root, 'cpu')
res = []
for steps in a.steps:
    cfg = skindualgen_train_config('quick').replace(steps=steps); t0 = time.time()
    rows = caption_dataset(CaptionConfig(), root, 'cpu', progress=False)
    path = train_cached(cfg, lambda: pair_training_set(rows, root, cfg.image_size), device='cpu', progress=False, loss_fn=skindualgen_loss(cfg.loss))
    train_s = json.loads((path/'train_state.json').read_text())['train_s']
    bb = load_trained(path, 'cpu')
    i, m = generate_pairs(bb, prompts, 2., 20, a.seed)
    c = consistency(i, m, unet).assign(steps=steps, train_s=train_s, config=cfg.hash())
    res.append(c)
    s = c.lesion_fraction < .1
    print(f'steps {steps}: consistency {c.dice.mean():.3f} (small {c.dice[s].mean():.3f}, n {s.sum()}; others {c.dice[~s].mean():.3f}), '
          f'train {train_s:.0f} s, wall {time.time() - t0:.0f} s', flush=True)
save_results(pd.concat(res, ignore_index=True), 'skindualgen_train_steps')
