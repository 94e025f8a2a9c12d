"""Does LesionGen's LoRA learn the concept words better when the expert-annotated images appear more often?

The rare criteria (streaks, blue-whitish veil, vessels) reach ISIC captions only when the concept classifier is
confident, so most of their captions come from Derm7pt and PH2 (a quarter of the LoRA's training set). Here both
LoRAs of the ablation (rich and label-only captions) are trained with those images repeated `--repeats` times (same
steps, seed and everything else; repeat 1 is the figure's), and each is scored by `concept_faithfulness` at `--m`
pairs per concept with a sampling seed the figure does not use (`--seed`), so the choice is not made on the figure's
own images. Prints per model the mean detection rate, lift (± SE) and probability shift, and the rich − label lift.

    DERMNB_DATA=../shared/dermdata python benchmarks/lesiongen_faithfulness_variants.py [--repeats 1 3] [--m 32]
"""
import argparse, time
import numpy as np, pandas as pd
from dermnb.core import data_root
from dermnb.lesiongen import load_lesiongen, load_concept_classifier, concept_faithfulness, faithfulness_summary
from _results import save_results

ap = argparse.ArgumentParser()
ap.add_argument('--repeats', type=int, nargs='+', default=[1, 3])
ap.add_argument('--m', type=int, default=32)
ap.add_argument('--seed', type=int, default=50000)
a = ap.parse_args()
root = data_root(); clf = load_concept_classifier(root=root); res = []
for rep in a.repeats:
    for k in ('rich', 'label'):
        t0 = time.time(); bb = load_lesiongen('quick', k, root, 'cpu', expert_repeat=rep, progress=False); t_train = time.time() - t0
        f = concept_faithfulness(bb, clf, a.m, 4., 20, a.seed).assign(captions=k, expert_repeat=rep, train_s=round(t_train, 1))
        res.append(f); print(f'repeat {rep} {k}: trained/loaded {t_train:.0f} s, scored {time.time() - t0 - t_train:.0f} s', flush=True)
df = pd.concat(res, ignore_index=True)
for rep, g in df.groupby('expert_repeat'):
    s = faithfulness_summary(g); d = s.loc['rich', 'lift'] - s.loc['label', 'lift']
    print(f'\nexpert_repeat {rep}:\n{s.round(3).to_string()}\nrich - label lift {d:+.3f} ± {np.hypot(s.loc["rich", "lift_se"], s.loc["label", "lift_se"]):.3f}')
print(df.pivot_table(index='concept', columns=['expert_repeat', 'captions'], values='lift').round(3).to_string())
save_results(df, 'lesiongen_faithfulness_variants')
