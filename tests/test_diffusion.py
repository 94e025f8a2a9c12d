"Process-level tests of the diffusion backbone: nothing heavy at import, and checkpoints that survive a kill."
import os, signal, subprocess, sys, textwrap, time
from pathlib import Path
import pytest

TOY = textwrap.dedent('''
    import sys, torch
    torch.set_num_threads(1)
    from dermnb.training import TrainConfig, train_diffusion
    class Toy(torch.utils.data.Dataset):
        def __init__(self): self.x = torch.rand(8, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
        def __len__(self): return 8
        def __getitem__(self, i): return {'image': self.x[i], 'label': -1, 'caption': ''}
    cfg = TrainConfig(image_size=8, channels=(16, 32), head_dim=8, batch_size=4, steps=int(sys.argv[2]), warmup=2,
                      ckpt_every=1, keep_ckpts=3, log_every=1)
    print(train_diffusion(cfg, Toy(), sys.argv[1], device='cpu', progress=False)['step'])
''')


def test_import_loads_nothing(tmp_path):
    "Importing the backbone needs no data root, no weights and no network."
    env = {**os.environ, 'HF_HUB_OFFLINE': '1', 'DERMNB_CACHE': str(tmp_path)}
    env.pop('DERMNB_DATA', None)
    code = "import dermnb.diffusion, dermnb.training, sys; print('ok')"
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith('ok'), r.stderr[-2000:]
    assert not any(tmp_path.iterdir())                      # nothing cached or downloaded at import


def test_checkpoints_survive_a_kill(tmp_path):
    "SIGKILL during training leaves only complete checkpoints, and the run resumes from the newest one."
    from dermnb.training import find_checkpoint, load_checkpoint
    script = tmp_path/'toy_train.py'; script.write_text(TOY)
    run = tmp_path/'run'
    p = subprocess.Popen([sys.executable, str(script), str(run), '100000'], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        t0 = time.time()
        while len(list((run/'checkpoints').glob('ckpt-*.safetensors'))) < 2 or time.time() - t0 < 1:
            assert p.poll() is None, p.stderr.read().decode()[-2000:]
            assert time.time() - t0 < 240, 'no checkpoints written'
            time.sleep(0.05)
    finally:
        p.send_signal(signal.SIGKILL); p.wait()
    cks = sorted((run/'checkpoints').glob('ckpt-*.safetensors'))
    assert cks and all(load_checkpoint(c)[1]['step'] == int(c.stem.split('-')[1]) for c in cks)   # every final-named file is whole
    last = load_checkpoint(find_checkpoint(run))[1]['step']
    r = subprocess.run([sys.executable, str(script), str(run), str(last + 3)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert int(r.stdout.strip().splitlines()[-1]) == last + 3
    assert load_checkpoint(find_checkpoint(run))[1]['step'] == last + 3
