"""Which DermCLIP recipe fits the quick profile's CPU budget best? Measured on the *validation* split.

Compares input size, how many EfficientNet-Lite0 layers train (`unlocked_layers`), precomputed augmentation views and
caption variants. The frozen bottom runs once per image (stems); deeper frozen parts are derived from shallower stems,
so every recipe at one input size shares one precomputation. Prints one row per recipe: wall-clock seconds for stems
and training, and validation zero-shot balanced accuracy (ISIC 2019, PH2) and retrieval recall@5.

    DERMNB_DATA=../shared/dermdata python benchmarks/clip_recipe.py [--threads 1] [--epochs 30] [--recipes 128:1:2:1,...] [--out /tmp/clip_recipe.csv]
"""
import argparse, time, warnings
import numpy as np, pandas as pd, torch, torch.nn.functional as F
from dermnb.core import data_root
from dermnb.dermclip import (dermclip_config, build_dermclip, dermclip_records, precompute_stems, caption_bank, fit_dermclip,
                             zero_shot_weights, balanced_accuracy, retrieval_recall, ISIC2019_CLASSES, PH2_CLASSES)
from dermnb.captions import concept_caption
from dermnb.data import LABELS

@torch.no_grad()
def deeper(model, stems, n_from, n_to):
    "Run frozen layers n_from..n_to-1 on stems of every view (N, V, C, h, w)."
    out = []
    for i in range(0, len(stems), 256):
        x = stems[i:i + 256].float(); n, v = x.shape[:2]; x = x.flatten(0, 1)
        for l in range(n_from, n_to): x = model.visual._layer(l, x)
        out.append(x.unflatten(0, (n, v)).half())
    return torch.cat(out)

@torch.no_grad()
def val_scores(model, stems, recs, cfg):
    "Validation metrics from view-0 stems: zero-shot balanced accuracy and retrieval recall@5."
    from dermnb.dermclip import dermclip_encoder
    enc = dermclip_encoder(model, cfg)
    img = F.normalize(torch.cat([model.visual.forward_stem(stems[i:i + 256, 0].float()) for i in range(0, len(stems), 256)]), dim=-1)
    out = {}
    isic = [i for i, r in enumerate(recs) if r.source == 'isic2019']
    names = [LABELS[i].replace('_', ' ') for i in ISIC2019_CLASSES]
    y = [names.index(recs[i].diagnosis.replace('_', ' ')) for i in isic]
    p = (img[isic] @ zero_shot_weights(enc, names).T).argmax(1).numpy()
    out['isic2019_bal_acc'], out['isic2019_acc'] = balanced_accuracy(y, p), float((p == np.array(y)).mean())
    ph = [i for i, r in enumerate(recs) if r.source == 'ph2']
    y = [PH2_CLASSES.index(recs[i].diagnosis_orig.lower()) for i in ph]
    p = (img[ph] @ zero_shot_weights(enc, PH2_CLASSES).T).argmax(1).numpy()
    out['ph2_bal_acc'] = balanced_accuracy(y, p)
    caps = [concept_caption(r) for r in recs]
    txt = torch.cat([enc.encode_text(caps[i:i + 256]) for i in range(0, len(caps), 256)])
    r = retrieval_recall(img, txt, caps); out['i2t_R@5'], out['t2i_R@5'], out['i2t_R@1'] = r['i2t_R@5'], r['t2i_R@5'], r['i2t_R@1']
    return out

if __name__ == '__main__':
    ap = argparse.ArgumentParser()
    ap.add_argument('--threads', type=int, default=1); ap.add_argument('--epochs', type=int, default=30)
    ap.add_argument('--out', default=str(__import__('pathlib').Path(__file__).resolve().parent/'results'/'clip_recipe.csv'))
    ap.add_argument('--limit', type=int, default=0)
    ap.add_argument('--recipes', default='128:0:1:1,128:0:2:1,128:1:1:1,128:1:2:1,128:1:2:0,128:3:2:1,192:0:1:1,192:1:1:1',
                    help='comma-separated size:unlocked_layers:views:caption_variants')
    a = ap.parse_args(); torch.set_num_threads(a.threads); warnings.simplefilter('ignore')
    rows = []
    todo = [tuple(int(x) for x in r.split(':')) for r in a.recipes.split(',')]
    for size in sorted({t[0] for t in todo}):
        mine = [t[1:] for t in todo if t[0] == size]
        views, umax = max(t[1] for t in mine), max(t[0] for t in mine)
        base = dermclip_config('quick', image_size=size, views=views, epochs=a.epochs, unlocked_layers=umax, limit=a.limit)
        cfg = base; model = build_dermclip(base)
        tr, va = dermclip_records(base, 'train'), dermclip_records(base, 'val')
        t0 = time.time(); st_tr = precompute_stems(model, tr, base); st_va = precompute_stems(model, va, base.replace(views=1))
        t_stem = time.time() - t0
        print(f'size {size}: {len(tr)} train, {len(va)} val, stems {t_stem:.0f}s ({1000 * t_stem / (len(tr) * views + len(va)):.1f} ms/view)', flush=True)
        stems = {umax: (st_tr, st_va)}
        for u in sorted({t[0] for t in mine} - {umax}, reverse=True):
            stems[u] = tuple(deeper(model, s, 18 - umax, 18 - u) for s in stems[umax])
        for u, v, capv in mine:
            cfg = base.replace(unlocked_layers=u, views=v, caption_variants=bool(capv))
            m = build_dermclip(cfg)
            texts, feats, idx = caption_bank(m, tr, cfg)
            s_tr, s_va = stems[u]
            t0 = time.time(); h = fit_dermclip(m, s_tr[:, :v].contiguous(), feats, idx, cfg); t_fit = time.time() - t0
            m.eval()
            row = {'image_size': size, 'unlocked_layers': u, 'views': v, 'caption_variants': capv, 'epochs': a.epochs,
                   'stem_s_per_view': t_stem / (views + len(va) / len(tr)), 'train_s': t_fit, 'final_loss': float(np.mean(h['loss'][-20:])),
                   **val_scores(m, s_va, va, cfg)}
            rows.append(row); print(pd.DataFrame([row]).round(3).to_string(index=False, header=len(rows) == 1), flush=True)
            tmp = a.out + '.tmp'; pd.DataFrame(rows).to_csv(tmp, index=False); __import__('os').replace(tmp, a.out)   # a stopped run keeps its rows
    df = pd.DataFrame(rows)
    print(df.round(3).to_string(index=False))
