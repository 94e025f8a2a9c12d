"DermCLIP end to end on real data: train a small model through the cache, evaluate it, and edit with its losses."
import warnings
import numpy as np, pytest, torch
from PIL import Image

from dermnb.clip import ClipEncoder, clip_direction_similarity, directional_clip_loss, text_direction
from dermnb.dermclip import (load_clip, dermclip_config, build_dermclip, dermclip_encoder, dermclip_records, evaluate_clip,
                             retrieval_recall)
from dermnb.captions import concept_caption
from dermnb.core import WeightsMissingError

SMALL = dict(limit=64, unlocked_layers=1, views=1, batch_size=64, lr=3e-3, embed_dim=64, proj_hidden=128, epochs=12)

@pytest.fixture(scope='module')
def small_clip(tmp_path_factory, data_root):
    torch.set_num_threads(1)
    cache = tmp_path_factory.mktemp('cache')
    cfg = dermclip_config('quick', **SMALL)
    enc = load_clip('dermclip', cfg=cfg, root=data_root, cache=cache, log=None)
    return enc, cfg, cache

def test_cache_roundtrip(small_clip, data_root):
    enc, cfg, cache = small_clip
    assert isinstance(enc, ClipEncoder) and not enc.training
    again = load_clip('dermclip', cfg=cfg, root=data_root, cache=cache, train=False)   # hit: no training
    with torch.no_grad():
        assert torch.allclose(again.encode_text('dermoscopy of a melanoma'), enc.encode_text('dermoscopy of a melanoma'), atol=1e-6)
    with pytest.raises(WeightsMissingError, match='train=True'):
        load_clip('dermclip', cfg=cfg.replace(seed=1), root=data_root, cache=cache, train=False)

def test_trained_beats_untrained_on_its_training_images(small_clip, data_root):
    "Retrieval on the training images themselves: a check that training reached the weights the encoder uses."
    enc, cfg, _ = small_clip
    untrained = dermclip_encoder(build_dermclip(cfg), cfg)
    recs = dermclip_records(cfg, 'train', data_root)
    caps = [concept_caption(r) for r in recs]
    with torch.no_grad():
        scores = {}
        for name, m in (('trained', enc), ('untrained', untrained)):
            img = torch.cat([m.encode_image([Image.open(r.image) for r in recs[i:i + 64]]) for i in range(0, len(recs), 64)])
            scores[name] = retrieval_recall(img, m.encode_text(caps), caps)
    assert scores['trained']['i2t_R@5'] > scores['untrained']['i2t_R@5'] + .1, scores
    assert scores['trained']['t2i_R@5'] > scores['untrained']['t2i_R@5'], scores

def test_evaluate_table(small_clip, data_root):
    enc, cfg, _ = small_clip
    tab = evaluate_clip({'small': enc}, data_root, limit=200, chance=True).set_index('model')
    assert tab.loc['small', 'n_retrieval'] == 200 and tab.loc['small', 'n_ph2'] > 30
    for c in ('isic2019_acc', 'isic2019_bal_acc', 'ph2_bal_acc', 'i2t_R@1', 'i2t_R@5', 't2i_R@1', 't2i_R@5'):
        assert 0 <= tab.loc['small', c] <= 1
        assert 0 < tab.loc['chance', c] < 1
    assert tab.loc['small', 'i2t_R@5'] >= tab.loc['small', 'i2t_R@1']

def test_directional_loss_raises_s_dir(small_clip, data_root):
    "Descending the directional loss on real pixels must move the edit along the text direction, as S_dir measures it."
    enc, cfg, _ = small_clip
    recs = dermclip_records(cfg, 'test', data_root)[:4]
    x0 = torch.stack([enc.preprocess(Image.open(r.image)) for r in recs])
    src, tgt = 'a nevus', 'a melanoma with a blue-whitish veil'
    tdir = text_direction(enc, src, tgt)
    xe = (x0 + .02 * torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))).requires_grad_(True)
    def s_dir(): return clip_direction_similarity(enc, x0, xe.detach(), f'dermoscopy of {src}', f'dermoscopy of {tgt}').mean().item()
    before, l0 = s_dir(), directional_clip_loss(enc, x0, xe, text_dir=tdir).item()
    opt = torch.optim.Adam([xe], lr=.02)
    for _ in range(15):
        opt.zero_grad(); loss = directional_clip_loss(enc, x0, xe, text_dir=tdir); loss.backward(); opt.step()
    assert loss.item() < l0 - .1 and s_dir() > before + .1, (l0, loss.item(), before, s_dir())
