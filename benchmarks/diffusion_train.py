"""Training and sampling speed of the diffusion backbone.

1. Training samples/s: dermnb's `train_diffusion` (EMA, clipping, logging, its seeded batch draw, real caption
   embeddings) against a plain diffusers training loop in the pattern of diffusers' unconditional training example
   (`DDPMScheduler.add_noise` + UNet + MSE + AdamW), on the same UNet and batch, both on tensors held in memory (data
   preparation is excluded from both). Two plain loops: the bare one, and the example with `--use_ema` (gradient
   clipping + EMA step), which does the same work as ours. Target: ours is not slower (ratio >= 1.0).
2. Sampling images/s of the backbone (DDIM with classifier-free guidance, plus the TAEF2 decode).
3. Peak memory of each (max RSS on CPU, max allocated on CUDA), each part in its own process.

Run: .venv/bin/python benchmarks/diffusion_train.py [--config base|pixel] [--steps 30] [--repeats 3] [--threads 1] [--device cpu]
Needs $DERMNB_DATA (TAEF2 weights and the first training images).
"""
import argparse, json, os, resource, statistics, subprocess, sys, tempfile, time
from pathlib import Path
import torch
from _results import save_results


def peak_mb(device):
    if device.type == 'cuda': return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # KiB on Linux


def part_ours(cfg, steps, device):
    """dermnb's trainer on the first images of the base training set; images/s of its training loop.
    Timed like the plain loop: from the end of step 1 (warm-up) to the end of the last step, read from the loss curve's
    per-step timestamps, so the final checkpoint write is excluded on both sides (neither loop writes one mid-run)."""
    import pandas as pd
    from dermnb.training import train_diffusion
    from dermnb.base import base_dataset
    n = max(cfg.batch_size * 4, 64)
    ds = torch.utils.data.Subset(base_dataset(cfg.image_size, 'train'), range(n))
    with tempfile.TemporaryDirectory() as d:
        s = train_diffusion(cfg.replace(steps=steps, max_minutes=0, snapshot_minutes=(), snapshot_steps=(), ckpt_every=10**9,
                                        log_every=1), ds, d, device=device, progress=False)
        c = pd.read_csv(f'{d}/loss.csv')
    steady = (c.images.iloc[-1] - c.images.iloc[0]) / (c.elapsed_s.iloc[-1] - c.elapsed_s.iloc[0])
    return {'images_per_s': steady, 'images_per_s_with_first_step_and_checkpoint': s['images_per_s'], 'steps': steps}


def part_plain(cfg, steps, device, ema=False):
    "A plain diffusers loop on the same UNet, batch and input shapes (random latents/embeddings in memory)."
    from diffusers import DDPMScheduler
    from dermnb.training import build_backbone
    bb, params = build_backbone(cfg, device)
    unet = bb.unet.train()
    sch = DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps, beta_schedule=cfg.beta_schedule)
    opt = torch.optim.AdamW(params, lr=cfg.lr)
    if ema:
        from diffusers.training_utils import EMAModel
        ema_model = EMAModel(params, decay=cfg.ema_decay, use_ema_warmup=True, power=2/3, foreach=True)
    B = cfg.batch_size
    shape = bb.latent_shape(B)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(shape, generator=g).to(device)
    ctx = torch.randn(B, 40, 384, generator=g).to(device) if cfg.cond == 'text' else None
    def step():
        noise = torch.randn(shape, device=device); t = torch.randint(0, 1000, (B,), device=device)
        kw = {'encoder_hidden_states': ctx} if ctx is not None else {}
        loss = torch.nn.functional.mse_loss(unet(sch.add_noise(x0, noise, t), t, **kw).sample, noise)
        opt.zero_grad(); loss.backward()
        if ema: torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if ema: ema_model.step(params)
    step()                                                    # warm-up, as ours has its first step inside
    if device.type == 'cuda': torch.cuda.synchronize()
    t0 = time.time()
    for _ in range(steps - 1): step()
    if device.type == 'cuda': torch.cuda.synchronize()
    return {'images_per_s': (steps - 1) * B / (time.time() - t0), 'steps': steps}


def part_sample(cfg, steps, device, n=32, ddim_steps=20):
    "Sampling speed: the config's (untrained) backbone, guided DDIM, decoded to pixels, at generate's default batch."
    from dermnb.training import build_backbone
    from dermnb.base import generate, sample_batch_size
    bb, _ = build_backbone(cfg, device); bb.unet.eval()
    caps = ['dermoscopy of a melanoma'] * n
    generate(bb, caps[:2], steps=2, batch_size=2)             # warm-up
    t0 = time.time(); generate(bb, caps, guidance_scale=2., steps=ddim_steps)
    return {'images_per_s': n / (time.time() - t0), 'ddim_steps': ddim_steps, 'guidance_scale': 2.0, 'n': n,
            'batch_size': sample_batch_size(bb)}


PARTS = {'ours': part_ours, 'plain': part_plain, 'plain_ema': lambda c, s, d: part_plain(c, s, d, ema=True), 'sample': part_sample}

if __name__ == '__main__':
    ap = argparse.ArgumentParser()
    ap.add_argument('--config', default='base', choices=['base', 'pixel'])
    ap.add_argument('--steps', type=int, default=30)
    ap.add_argument('--threads', type=int, default=1)
    ap.add_argument('--device', default='cpu')
    ap.add_argument('--repeats', type=int, default=3)
    ap.add_argument('--part', default=None, choices=list(PARTS))
    a = ap.parse_args()
    if a.part:                                                # one measurement, in this process
        torch.set_num_threads(a.threads)
        from dermnb.core import get_device
        from dermnb.base import base_config, pixel_config
        dev = get_device(a.device)
        cfg = (base_config if a.config == 'base' else pixel_config)('quick')
        r = PARTS[a.part](cfg, a.steps, dev)
        print(json.dumps({**r, 'peak_mb': peak_mb(dev)}))
        sys.exit(0)
    def run(part):
        out = subprocess.run([sys.executable, __file__, '--part', part, '--config', a.config, '--steps', str(a.steps),
                              '--threads', str(a.threads), '--device', a.device], capture_output=True, text=True)
        if out.returncode: sys.exit(f"{part} failed:\n{out.stderr[-2000:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])
    # a shared machine's speed drifts: alternate the loops and take the median of the paired ratios
    order = ('plain', 'plain_ema', 'ours')          # reversed every other round, so a drift in speed cancels out
    rounds = [{k: run(k) for k in (order if i % 2 == 0 else order[::-1])} for i in range(a.repeats)]
    med = lambda k: statistics.median(r[k]['images_per_s'] for r in rounds)
    ratio = lambda ref: statistics.median(r['ours']['images_per_s'] / r[ref]['images_per_s'] for r in rounds)
    sample = run('sample')
    print(f"config={a.config} device={a.device} threads={a.threads} steps={a.steps} repeats={a.repeats}")
    for i, r in enumerate(rounds):
        print(f"  round {i}: " + ', '.join(f"{k} {r[k]['images_per_s']:.1f}" for k in order) + ' images/s' + (' (run in reverse)' if i % 2 else ''))
    print(f"training images/s  ours {med('ours'):.1f}  plain diffusers loop {med('plain'):.1f}  with clipping + EMA {med('plain_ema'):.1f}")
    for ref, what in (('plain', 'the bare loop'), ('plain_ema', 'the loop with clipping + EMA (same work as ours)')):
        q = ratio(ref)
        print(f"  ours / {what}: median paired ratio {q:.3f} (target >= 1.0: {'met' if q >= 1 else 'MISSED'})")
    print(f"sampling images/s  {sample['images_per_s']:.2f} (DDIM {sample['ddim_steps']} steps, guidance 2, decoded, batch {sample['batch_size']})")
    print(f"peak memory MB     plain {rounds[0]['plain']['peak_mb']:.0f}  plain+EMA {rounds[0]['plain_ema']['peak_mb']:.0f}  "
          f"ours {rounds[0]['ours']['peak_mb']:.0f}  sampling {sample['peak_mb']:.0f}")
    rows = [{'config': a.config, 'measure': f'training images/s, {k}', 'value': med(k)} for k in order]
    rows += [{'config': a.config, 'measure': f'ours / {ref} (median paired ratio)', 'value': ratio(ref)} for ref in ('plain', 'plain_ema')]
    rows += [{'config': a.config, 'measure': 'sampling images/s', 'value': sample['images_per_s']}]
    rows += [{'config': a.config, 'measure': f'peak MB, {k}', 'value': rounds[0][k]['peak_mb']} for k in order]
    rows += [{'config': a.config, 'measure': 'peak MB, sampling', 'value': sample['peak_mb']}]
    prev = Path(__file__).resolve().parent/'results'/'diffusion_train.csv'
    if prev.exists():                                     # keep the other config's rows
        import pandas as pd
        old = pd.read_csv(prev); rows = old[old.config != a.config].drop(columns=['machine', 'threads', 'measured'], errors='ignore').to_dict('records') + rows
    save_results(rows, 'diffusion_train')
