"""Why dermnb flushes denormal floats to zero on the CPU (`dermnb.core.flush_denormals`).

Times a training step (forward + backward) of the quick base model's UNet on real caption embeddings (MiniLM tokens of
real concept captions), in two fresh processes: one with dermnb's default (denormals flushed at import), one with
DERMNB_KEEP_DENORMALS=1. Also times random embeddings with the flag on, which have no peaked attention. Prints ms per
step and the ratio; writes benchmarks/results/denormals.csv.

Run: .venv/bin/python benchmarks/denormals.py [--steps 20] [--threads 2]
"""
import argparse, json, os, subprocess, sys, time
import torch
from _results import save_results

def part(steps, random_emb):
    import dermnb.core
    from dermnb.base import base_config, base_dataset
    from dermnb.training import build_backbone
    cfg = base_config('quick'); bb, params = build_backbone(cfg, 'cpu')
    ds = base_dataset(cfg.image_size, 'train'); caps = [ds[i]['caption'] for i in range(cfg.batch_size)]
    with torch.no_grad(): emb = bb.text_encoder(caps)
    if random_emb: emb = torch.randn_like(emb)
    x = torch.randn(bb.latent_shape(cfg.batch_size)); t = torch.randint(0, 1000, (cfg.batch_size,))
    unet = bb.unet.train(); times = []
    for i in range(steps + 2):
        t0 = time.perf_counter()
        unet(x, t, encoder_hidden_states=emb).sample.pow(2).mean().backward()
        if i >= 2: times.append(time.perf_counter() - t0)
    return {'ms_per_step': 1000 * sorted(times)[len(times) // 2]}

if __name__ == '__main__':
    ap = argparse.ArgumentParser(); ap.add_argument('--steps', type=int, default=20); ap.add_argument('--threads', type=int, default=2)
    ap.add_argument('--part', choices=['real', 'random']); a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.part: print(json.dumps(part(a.steps, a.part == 'random'))); sys.exit(0)
    def run(p, keep):
        env = {**os.environ, **({'DERMNB_KEEP_DENORMALS': '1'} if keep else {})}
        env.pop('DERMNB_KEEP_DENORMALS', None) if not keep else None
        r = subprocess.run([sys.executable, __file__, '--part', p, '--steps', str(a.steps), '--threads', str(a.threads)], capture_output=True, text=True, env=env)
        if r.returncode: sys.exit(r.stderr[-2000:])
        return json.loads(r.stdout.strip().splitlines()[-1])['ms_per_step']
    flushed, kept, rnd = run('real', False), run('real', True), run('random', False)
    print(f"UNet train step, real caption embeddings: {flushed:.1f} ms with denormals flushed, {kept:.1f} ms kept "
          f"(kept / flushed = {kept / flushed:.2f}); random embeddings, flushed: {rnd:.1f} ms")
    save_results([{'embeddings': 'real captions', 'denormals': 'flushed (dermnb default)', 'ms_per_step': flushed},
                  {'embeddings': 'real captions', 'denormals': 'kept (DERMNB_KEEP_DENORMALS=1)', 'ms_per_step': kept},
                  {'embeddings': 'random', 'denormals': 'flushed (dermnb default)', 'ms_per_step': rnd},
                  {'embeddings': 'real captions', 'denormals': 'kept / flushed', 'ms_per_step': kept / flushed}], 'denormals')
