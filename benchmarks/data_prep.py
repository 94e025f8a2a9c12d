"""Data preparation on full-size inputs: first run vs cached, and full vs reduced-scale (draft) JPEG decoding.

The development copies are 256x192, the official ISIC 2018 Task 1 images up to several thousand pixels a side. This
script simulates full-size inputs: it upscales N real ISIC 2018 Task 1 pairs from $DERMNB_DATA to WxH (JPEG images,
PNG masks, bicubic / nearest) in a temporary folder laid out like the official release, and times reading every item
of a `dermnb.data.DermDataset` at a profile size, with masks (as the segmenter reads them) and images only (as the
base model and DermCLIP read them), four ways:
  full decode         cache=False, draft=False  (what every figure notebook did before)
  draft decode        cache=False, draft=True   (big JPEGs decoded at 1/2, 1/4 or 1/8 scale, see DRAFT_MARGIN)
  first run, cached   cache=True on an empty cache: decodes (with draft) and stores the arrays
  second run          a new dataset on the same files: reads the cached arrays
It also prints how close the draft pixels are to the full-decode pixels (PSNR, dB).
Target: the second run is at least 10x faster than the full decode.

Run: .venv/bin/python benchmarks/data_prep.py [--n 40] [--width 4000 --height 3000] [--size 64] [--threads 2]
Writes benchmarks/results/data_prep.csv.
"""
import argparse, os, sys, tempfile, time, shutil
from pathlib import Path
import numpy as np


def simulate(root:Path, src:Path, n:int, w:int, h:int):
    "Upscaled copies of n real ISIC 2018 Task 1 pairs in the official layout under root."
    from PIL import Image
    idir, mdir = root/'isic2018_task1'/'ISIC2018_Task1-2_Training_Input', root/'isic2018_task1'/'ISIC2018_Task1_Training_GroundTruth'
    idir.mkdir(parents=True); mdir.mkdir(parents=True)
    ids = sorted(p.stem for p in (src/'isic2018_task1'/'ISIC2018_Task1-2_Training_Input').glob('ISIC_*.jpg'))[:n]
    for i in ids:
        Image.open(src/'isic2018_task1'/'ISIC2018_Task1-2_Training_Input'/f'{i}.jpg').convert('RGB').resize((w, h), Image.BICUBIC).save(idir/f'{i}.jpg', quality=90)
        Image.open(src/'isic2018_task1'/'ISIC2018_Task1_Training_GroundTruth'/f'{i}_segmentation.png').resize((w, h), Image.NEAREST).save(mdir/f'{i}_segmentation.png')
    return ids


def read_all(ds):
    "Seconds to read every item (image and mask) of a dataset, and the uint8 images."
    t0 = time.perf_counter()
    xs = [ds._load(i)[0] for i in range(len(ds))]
    return time.perf_counter() - t0, np.stack([x.numpy() for x in xs])


if __name__ == '__main__':
    ap = argparse.ArgumentParser()
    ap.add_argument('--n', type=int, default=40, help='images')
    ap.add_argument('--width', type=int, default=4000); ap.add_argument('--height', type=int, default=3000)
    ap.add_argument('--size', type=int, default=64, help='square side the dataset serves (quick profile: 64)')
    ap.add_argument('--fit', default='pad')
    ap.add_argument('--threads', type=int, default=2)
    ap.add_argument('--out', default=str(Path(__file__).parent/'results'/'data_prep.csv'))
    a = ap.parse_args()
    import torch; torch.set_num_threads(a.threads)
    import pandas as pd
    from dermnb.core import data_root, atomic_save
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp); os.environ['DERMNB_CACHE'] = str(tmp/'cache')
        t0 = time.perf_counter(); simulate(tmp/'root', data_root(), a.n, a.width, a.height)
        print(f"simulated {a.n} ISIC 2018 pairs at {a.width}x{a.height} in {time.perf_counter() - t0:.1f} s "
              f"({sum(p.stat().st_size for p in (tmp/'root').rglob('*.jpg')) / a.n / 1e6:.1f} MB per JPEG)")
        from dermnb.data import load_isic2018_task1, DermDataset
        recs = load_isic2018_task1(tmp/'root', strict=True, join=False)
        rows, ok = [], True
        for masks in (True, False):
            ds = lambda **kw: DermDataset(recs, a.size, a.fit, with_mask=masks, **kw)
            runs = {}
            runs['full decode'] = read_all(ds(cache=False, draft=False))
            runs['draft decode'] = read_all(ds(cache=False, draft=True))
            runs['first run, cached'] = read_all(ds(cache=True))
            runs['second run'] = read_all(ds())
            full = runs['full decode'][1].astype(float)
            for name, (sec, x) in runs.items():
                mse = ((x.astype(float) - full) ** 2).mean()
                rows.append({'run': name, 'masks': masks, 'n': a.n, 'width': a.width, 'height': a.height, 'size': a.size, 'fit': a.fit,
                             'threads': a.threads, 'seconds': round(sec, 3), 'ms_per_image': round(1000 * sec / a.n, 2),
                             'speedup_vs_full': round(runs['full decode'][0] / sec, 1),
                             'psnr_vs_full_db': round(10 * np.log10(255 ** 2 / mse), 1) if mse > 0 else float('inf')})
            print(f"reading {a.n} items ({'image + mask' if masks else 'image only'}) at {a.size} px ({a.fit}), {a.threads} threads:")
            for r in rows[-4:]:
                print(f"  {r['run']:18s} {r['seconds']:7.2f} s  {r['ms_per_image']:8.2f} ms/image  {r['speedup_vs_full']:6.1f}x vs full decode"
                      f"  PSNR vs full decode {r['psnr_vs_full_db']} dB")
            first, second = runs['first run, cached'][0], runs['second run'][0]
            print(f"  second run vs first run: {first / second:.0f}x faster; draft decode vs full decode: "
                  f"{runs['full decode'][0] / runs['draft decode'][0]:.1f}x")
            ok &= runs['full decode'][0] / second >= 10
        tab = pd.DataFrame(rows)
    print(f"target (second run >= 10x faster than the full decode, both ways): {'met' if ok else 'MISSED'}")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_save(a.out, lambda t: tab.to_csv(t, index=False)); print(f"wrote {a.out}")
