#!/usr/bin/env python
"""DiffSeg speed: all (t, seed) evaluations of a batch in few UNet calls vs the naive per-step loop.

Prints images/s of both, their ratio (target >= 3x; also against the naive loop given the same channels-last weights), and the peak resident memory of each (measured in a fresh
subprocess, so the two do not share a high-water mark). Uses the quick profile's DiffSeg model with random weights:
speed does not depend on training."""
import sys, time, json, resource, subprocess, argparse, statistics
import torch

def build(args):
    "The quick profile's DiffSeg model (random weights; speed does not depend on training)."
    from dermnb.training import build_backbone
    from dermnb.diffseg import diffseg_train_config
    bb, _ = build_backbone(diffseg_train_config('quick'), 'cpu')
    bb.unet.eval(); return bb

def run(mode, n, reps):
    from dermnb.diffseg import DiffSegConfig, diffusion_difference, _noised
    from dermnb.diffusion import unet_eps
    torch.manual_seed(0); torch.set_num_threads(2)
    bb = build(None); cfg = DiffSegConfig()
    z = torch.rand(n, 3, bb.image_size, bb.image_size) * 2 - 1     # images at the model's input size
    conds = [bb.cond([1]), bb.cond([0]), bb.null(1)]                # lesion, healthy, null (guidance)
    def naive():                                                    # one UNet call per image, step, seed and condition
        with torch.no_grad():
            for i in range(n):
                for t in cfg.timesteps:
                    for s in cfg.seeds:
                        x, tt = _noised(bb, bb.encode(z[i:i+1]), [t], [s])
                        for c in conds: unet_eps(bb.unet, x, tt, c)
    def batched(): diffusion_difference(bb, z, cfg.replace(sigma=0))   # channels-last weights inside (weights_layout)
    if mode == 'naive-channels-last': bb.unet.to(memory_format=torch.channels_last)
    f = batched if mode == 'batched' else naive
    f()                                       # warm-up
    times = []
    for _ in range(reps):                     # the median run: this shared CPU's speed drifts between runs
        t0 = time.perf_counter(); f(); times.append(time.perf_counter() - t0)
    dt = statistics.median(times)
    return {'mode': mode, 'images_per_s': n / dt, 'peak_rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            'unet_evals_per_image': len(conds) * len(cfg.timesteps) * len(cfg.seeds)}

if __name__ == '__main__':
    ap = argparse.ArgumentParser(); ap.add_argument('--n', type=int, default=32); ap.add_argument('--reps', type=int, default=5)
    ap.add_argument('--mode'); a = ap.parse_args()
    if a.mode: print(json.dumps(run(a.mode, a.n, a.reps))); sys.exit()
    res = {}
    for mode in ('naive', 'naive-channels-last', 'batched'):
        out = subprocess.run([sys.executable, __file__, '--mode', mode, '--n', str(a.n), '--reps', str(a.reps)], capture_output=True, text=True, check=True)
        res[mode] = json.loads(out.stdout.strip().splitlines()[-1])
        r = res[mode]; print(f"{mode:>8}: {r['images_per_s']:.2f} images/s, peak RSS {r['peak_rss_mb']:.0f} MB, {r['unet_evals_per_image']} UNet evaluations per image")
    ratio = res['batched']['images_per_s'] / res['naive']['images_per_s']
    print(f"speed ratio batched/naive: {ratio:.2f}x (target >= 3x) -> {'OK' if ratio >= 3 else 'BELOW TARGET'}")
    print(f"  vs the naive loop in the same channels-last layout: {res['batched']['images_per_s'] / res['naive-channels-last']['images_per_s']:.2f}x "
          "(the layout alone does not speed up batch-1 calls; the batching does)")
    sys.path.insert(0, str(__import__('pathlib').Path(__file__).resolve().parent))
    from _results import save_results
    save_results([{**res[m], 'ratio_vs_naive': res[m]['images_per_s'] / res['naive']['images_per_s'], 'n_images': a.n} for m in res], 'diffseg_batching')
