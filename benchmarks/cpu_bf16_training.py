"""bfloat16 autocast on the CPU: what it would buy the quick profile's training, and what it costs in precision.

The quick profile trains in float32 on the CPU (`training.make_accelerator` allows mixed precision on CUDA only). This
measures, for the training step of each model the figures train (forward + backward + AdamW step, one fixed batch,
2 threads), the seconds per step in float32 and under `torch.autocast('cpu', torch.bfloat16)`, and the precision cost:
the relative loss difference and the cosine between the two gradients on the same batch.

- DiffSeg's 32-px pixel UNet (batch 32, class-conditional): 3 of the diffseg figure's diffusion trainings;
- LesionGen's LoRA on the shared latent base model (batch 32, 8x8 TAEF2 latents, text cross-attention);
- the supervised / student U-Net (EfficientNet-Lite0 encoder, 128 px, batch 16).

Prints each ratio fp32 / bf16 (> 1: bf16 faster). No model is trained or changed.

    DERMNB_DATA=../shared/dermdata python benchmarks/cpu_bf16_training.py [--repeats 10]
"""
import argparse, time
import torch, torch.nn.functional as F
from _results import save_results


def bench(name, model, loss_fn, repeats):
    "Seconds per training step in fp32 and bf16 autocast, and the bf16 loss/gradient agreement with fp32."
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, 1e-4)
    def grads(bf16):
        model.zero_grad(set_to_none=True)
        with torch.autocast('cpu', torch.bfloat16, enabled=bf16): loss = loss_fn()
        loss.float().backward()
        return loss.item(), torch.cat([p.grad.flatten().float() for p in params if p.grad is not None])
    l32, g32 = grads(False); l16, g16 = grads(True)
    out = {'model': name, 'trainable_params': sum(p.numel() for p in params),
           'loss_rel_diff': abs(l16 - l32) / abs(l32), 'grad_cosine': float(F.cosine_similarity(g32, g16, dim=0))}
    for bf16 in (False, True):
        for i in range(repeats + 2):
            if i == 2: t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            with torch.autocast('cpu', torch.bfloat16, enabled=bf16): loss = loss_fn()
            loss.float().backward(); opt.step()
        out['s_per_step_bf16' if bf16 else 's_per_step_fp32'] = (time.perf_counter() - t0) / repeats
    out['speedup'] = out['s_per_step_fp32'] / out['s_per_step_bf16']
    print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in out.items()}, flush=True)
    return out


if __name__ == '__main__':
    ap = argparse.ArgumentParser(); ap.add_argument('--repeats', type=int, default=10); a = ap.parse_args()
    torch.set_num_threads(2); torch.manual_seed(0)
    from dermnb.training import build_backbone
    from dermnb.diffseg import diffseg_train_config
    from dermnb.lesiongen import lesiongen_train_config
    from dermnb.segmenter import LesionUNet, SegmenterConfig, seg_loss
    rows = []
    # DiffSeg: pixel UNet2DModel, class-conditional
    bb, _ = build_backbone(diffseg_train_config()); u = bb.unet.train()
    x, t, y = torch.randn(32, 3, 32, 32), torch.randint(0, 1000, (32,)), torch.randint(0, 3, (32,))
    rows.append(bench('diffseg pixel UNet (32 px, batch 32)', u, lambda: F.mse_loss(u(x, t, class_labels=y).sample.float(), x), a.repeats))
    # LesionGen: LoRA on the shared latent base model (loads the cached base; trains it on a cache miss)
    bb, _ = build_backbone(lesiongen_train_config('quick', 'rich')); u = bb.unet.train()
    z, tz = torch.randn(32, u.config.in_channels, 8, 8), torch.randint(0, 1000, (32,))
    ctx = bb.cond(['a dermoscopic image of melanoma with streaks'] * 32)
    rows.append(bench('LesionGen LoRA on the base UNet (8x8 latents, batch 32)', u,
                      lambda: F.mse_loss(u(z, tz, encoder_hidden_states=ctx).sample.float(), z), a.repeats))
    # the supervised / student U-Net at the quick size
    c = SegmenterConfig.for_profile('quick'); net = LesionUNet(pretrained=True, width=c.width).train()
    im, m = torch.randn(c.batch_size, 3, c.size, c.size), (torch.rand(c.batch_size, 1, c.size, c.size) > .5).float()
    rows.append(bench(f'segmentation U-Net (Lite0, {c.size} px, batch {c.batch_size})', net, lambda: seg_loss(net(im).float(), m), a.repeats))
    save_results(rows, 'cpu_bf16_training')
