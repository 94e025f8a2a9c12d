"`dermnb train base`, `dermnb generate` and `dermnb eval fid` end to end, with the base model shrunk to seconds."
import json, shutil
import pytest, torch
from PIL import Image


@pytest.fixture
def tiny_base(tmp_path, data_root, monkeypatch):
    "The real CLI code paths, with `base_config` / `base_dataset` made tiny (16 px, 6 steps, 8 real training images)."
    import dermnb.base as T
    monkeypatch.setenv('DERMNB_CACHE', str(tmp_path/'cache'))
    cfg = T.base_config('quick').replace(data='test:first-8', image_size=16, channels=(32, 32), head_dim=16, steps=6,
                                         snapshot_steps=(), batch_size=4, warmup=2, ckpt_every=3, log_every=1)
    real_dataset = T.base_dataset
    monkeypatch.setattr(T, 'base_config', lambda profile='quick', seed=0: cfg)
    monkeypatch.setattr(T, 'base_dataset', lambda image_size=64, split='train', root=None, seed=0:
                        torch.utils.data.Subset(real_dataset(image_size, split, root, seed), range(8)))
    return cfg


def test_train_generate_eval_fid(tiny_base, tmp_path, data_root, capsys):
    from dermnb.cli import main
    assert main(['train', 'base', '--root', str(data_root), '--device', 'cpu']) == 0
    out, err = capsys.readouterr()
    assert f'{tiny_base.steps} steps' in err and 'cached at' in out
    path = out.split('cached at')[1].strip()
    assert main(['train', 'base', '--root', str(data_root), '--device', 'cpu']) == 0      # a cache hit: same folder
    assert capsys.readouterr().out.split('cached at')[1].strip() == path

    gen = tmp_path/'gen'
    assert main(['generate', '--method', 'base', '--n', '4', '--out', str(gen), '--seed', '1', '--root', str(data_root),
                 '--device', 'cpu']) == 0
    files = sorted(gen.glob('*.png'))
    assert len(files) == 4 and all(Image.open(f).size == (16, 16) for f in files)

    real = tmp_path/'real'; real.mkdir()
    for f in sorted((data_root/'isic2018_task1'/'ISIC2018_Task1-2_Training_Input').glob('ISIC_*.jpg'))[:4]: shutil.copy(f, real)
    capsys.readouterr()
    assert main(['eval', 'fid', str(real), str(gen), '--json', '--device', 'cpu']) == 0
    res = json.loads(capsys.readouterr().out)
    assert set(res) == {'fid', 'kid_mean', 'kid_std', 'n_a', 'n_b'} and (res['n_a'], res['n_b']) == (4, 4)
    assert res['fid'] > 0 and res['kid_std'] >= 0


def test_budgeted_training_shows_eta(tiny_base, tmp_path, data_root, capsys):
    "A training run shows its steps with an ETA, and the time budget left when it has one."
    import dermnb.base as T
    T.train_diffusion(tiny_base.replace(max_minutes=5, steps=2), T.base_dataset(16), tmp_path/'run', device='cpu')
    err = capsys.readouterr().err
    assert 'train' in err and '/2 steps' in err and 'ETA' in err and 'budget left=05:00' in err, err
