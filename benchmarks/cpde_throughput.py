"""CPDE editing throughput: dermnb's batched asymmetric sampler against the naive Asyrp loop.

The naive loop edits one image at a time and makes two UNet calls per step (plain and with Δh), as Asyrp's official
code does at batch 1. dermnb's `apply_editor` edits a batch at once and puts the plain and the edited call into one
UNet batch of 2B. Both run the same steps, t_edit and Δh module (an untrained SCT of the real shape: the cost does not
depend on the weights) on the quick base model's architecture, 64-px images, the editors' DDIM steps (`EDIT_STEPS`, 40). Target: >= 2x images/s.

Run: .venv/bin/python benchmarks/cpde_throughput.py [--n 32] [--threads 2] [--steps 40]
"""
import argparse, time
import numpy as np, torch
from _results import save_results

if __name__ == '__main__':
    ap = argparse.ArgumentParser(); ap.add_argument('--n', type=int, default=32); ap.add_argument('--threads', type=int, default=2)
    ap.add_argument('--steps', type=int, default=None); a = ap.parse_args(); torch.set_num_threads(a.threads)
    from dermnb.base import base_config
    from dermnb.training import build_backbone
    from dermnb.cpde import EditorConfig, make_editor, EditSet, Inversion, apply_editor, asym_ddim, _delta_fn, EDIT_STEPS
    a.steps = a.steps or EDIT_STEPS
    bb, _ = build_backbone(base_config('quick'), 'cpu'); bb.unet.eval().requires_grad_(False)
    cfg = EditorConfig(method='sct', steps=a.steps, t_edit=501, t_addnoise=201)
    ed = make_editor(cfg).eval()
    torch.nn.init.normal_(ed.out[-1].weight, std=.01)            # a non-zero Δh, like a trained one
    conds = {'semantics': torch.randn(10, 512), 'direction': torch.randn(10, 256), 'cos': torch.ones(10)}
    xT = torch.randn(a.n, 32, 8, 8); traj = torch.stack([xT] * (a.steps + 1))
    es = EditSet([str(i) for i in range(a.n)], torch.zeros(a.n, 3, 64, 64), torch.ones(a.n, 1, 64, 64), ['x'] * a.n)
    inv = Inversion(traj, traj[:-1], [], a.steps); eidx = torch.arange(a.n) % 10
    with torch.no_grad():
        apply_editor(bb, ed, cfg, es.subset(range(2)), inv.subset(range(2)), eidx[:2], conds)       # warm-up
        t0 = time.perf_counter(); apply_editor(bb, ed, cfg, es, inv, eidx, conds); batched = a.n / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        for i in range(a.n):                                     # the naive loop: one image, two calls per step
            delta = _delta_fn(ed, bb.unet, cfg, conds, eidx[i:i + 1])
            x = xT[i:i + 1]
            from diffusers import DDIMScheduler
            from dermnb.cpde import _x0_eps
            from dermnb.diffusion import hspace_hook
            sch = DDIMScheduler.from_config(bb.scheduler.config); sch.set_timesteps(a.steps); null = bb.null(1)
            for t in sch.timesteps.tolist():
                tp = t - 1000 // a.steps; abp = sch.alphas_cumprod[tp] if tp >= 0 else sch.final_alpha_cumprod
                vo = bb.unet(x, t, encoder_hidden_states=null).sample
                if t >= cfg.t_edit:
                    with hspace_hook(bb.unet, delta=delta, record=False): ve = bb.unet(x, t, encoder_hidden_states=null).sample
                else: ve = vo
                x0, _ = _x0_eps(ve, x, t, sch); _, eps = _x0_eps(vo, x, t, sch)
                x = abp.sqrt() * x0 + (1 - abp).sqrt() * eps
            bb.decode(x)
        naive = a.n / (time.perf_counter() - t0)
    print(f"editing images/s: batched {batched:.2f}, naive Asyrp loop {naive:.2f}; ratio {batched / naive:.2f}x (target >= 2x: {'met' if batched / naive >= 2 else 'MISSED'})")
    save_results([{'measure': 'images/s, dermnb apply_editor (batched, 2B calls)', 'value': batched},
                  {'measure': 'images/s, naive Asyrp loop (batch 1, two calls per step)', 'value': naive},
                  {'measure': 'ratio', 'value': batched / naive}, {'measure': 'images', 'value': a.n}, {'measure': 'steps', 'value': a.steps}], 'cpde_throughput')
