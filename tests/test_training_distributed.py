"""The distributed path of the diffusion trainer: `accelerate launch` with two CPU processes (gloo) on a tiny config.

It must finish, only the main process writes checkpoints and the model, and the loss trajectory must match a
single-process run with the same config (the same global batch) up to float rounding: the two processes split every
micro-batch and DDP averages their gradients, which is the single-process gradient of the mean loss."""
import json, os, subprocess, sys, textwrap
from pathlib import Path
import pandas as pd
import pytest

SCRIPT = textwrap.dedent('''
    import sys, json, os, torch
    torch.set_num_threads(1)
    import dermnb.training as T
    writes = []
    real_save = T.save_checkpoint
    def counting_save(path, tensors, meta):          # record which process writes checkpoints
        writes.append(str(path)); return real_save(path, tensors, meta)
    T.save_checkpoint = counting_save
    class Toy(torch.utils.data.Dataset):
        def __init__(self):
            g = torch.Generator().manual_seed(0)
            self.x = torch.nn.functional.interpolate(torch.rand(16, 3, 2, 2, generator=g), size=(8, 8), mode='bilinear') * 2 - 1
        def __len__(self): return 16
        def __getitem__(self, i): return {'image': self.x[i], 'label': i % 3, 'caption': ''}
    cfg = T.TrainConfig(image_size=8, channels=(16, 32), head_dim=8, cond='class', num_classes=3, batch_size=4, grad_accum=2,
                        steps=6, warmup=2, lr=3e-3, ckpt_every=3, log_every=1, max_grad_norm=1.0)
    s = T.train_diffusion(cfg, Toy(), sys.argv[1], device='cpu', progress=False)
    rank = int(os.environ.get('RANK', 0))
    with open(os.path.join(sys.argv[1], f'writes-rank{rank}.json'), 'w') as f:
        json.dump({'writes': writes, 'num_processes': s['num_processes'], 'step': s['step']}, f)
''')


def run(cmd, **kw):
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, **kw)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return r


def test_two_processes_match_one(tmp_path):
    script = tmp_path/'train_toy.py'; script.write_text(SCRIPT)
    one, two = tmp_path/'one', tmp_path/'two'
    run([sys.executable, str(script), str(one)])
    accelerate = Path(sys.executable).parent/'accelerate'
    run([str(accelerate), 'launch', '--multi_gpu', '--num_processes', '2', '--num_machines', '1', '--mixed_precision', 'no',
         '--dynamo_backend', 'no', '--main_process_port', '29517', str(script), str(two)])
    w0, w1 = (json.loads((two/f'writes-rank{r}.json').read_text()) for r in (0, 1))
    assert (w0['num_processes'], w1['num_processes'], w0['step'], w1['step']) == (2, 2, 6, 6)
    assert len(w0['writes']) == 2 and w1['writes'] == []                        # only rank 0 checkpoints (steps 3, 6)
    assert sorted(p.name for p in (two/'checkpoints').iterdir()) == ['ckpt-00000003.safetensors', 'ckpt-00000006.safetensors']
    assert (two/'model'/'backbone.json').exists()
    a, b = pd.read_csv(one/'loss.csv'), pd.read_csv(two/'loss.csv')
    assert list(a.step) == list(b.step) == list(range(1, 7))
    diff = (a.loss - b.loss).abs().max()
    assert diff < 1e-4 * a.loss.abs().max(), (a.loss.tolist(), b.loss.tolist())   # same trajectory up to float rounding
