"Shared by the CPDE benchmarks: a split's edit pairs in their source state, and the judges that score edits of them."
from dataclasses import dataclass
import torch


@dataclass
class EditBench:
    "The images of a split, the (image, edit) pairs drawn from it, and the figure's judges."
    split_set: object      # the split's EditSet
    sub: object            # one image per pair (EditSet)
    eidx: torch.Tensor     # each pair's edit (index into ALL_EDITS)
    edits: list            # each pair's Edit
    judges: tuple          # (concept classifier, diagnosis head, U-Net)
    device: str = 'cpu'

    def score(self, edited, clip):
        "`edit_metrics` of edited images of `sub` (one row per pair)."
        from dermnb.cpde import edit_metrics
        return edit_metrics(self.sub.images, edited, self.sub.masks, self.edits, clip, *self.judges, self.device)


def edit_bench(split:str, seed:int, per_edit:int=16, device:str='cpu')->EditBench:
    "`per_edit` pairs per edit of PH2 + Derm7pt `split` (source state, drawn with `seed`), masks from the U-Net where none."
    from dermnb.core import data_root
    from dermnb.segmenter import load_segmenter, SegmenterConfig
    from dermnb.lesiongen import load_concept_classifier
    from dermnb.cpde import ALL_EDITS, cpde_images, source_pairs, diagnosis_head
    root = data_root(); es = cpde_images(split, 'unet', 'quick', root, device)
    pairs = source_pairs(es, list(ALL_EDITS), per_edit, seed)
    eidx = torch.tensor([e for _, e in pairs])
    judges = (load_concept_classifier(root=root), diagnosis_head(root), load_segmenter(SegmenterConfig.for_profile('quick'), root, device))
    return EditBench(es, es.subset([i for i, _ in pairs]), eidx, [ALL_EDITS[j] for j in eidx.tolist()], judges, device)


def summary(m)->dict:
    "The benchmarks' columns from `edit_metrics` rows: means, S_dir's SE, and concept detection for 'add' / 'remove'."
    add, rem = m[m.direction == 'add'], m[m.direction == 'remove']
    return {'n': len(m), 's_dir': m.s_dir.mean(), 's_dir_se': m.s_dir.std() / len(m) ** .5, 'ns_lpips': m.ns_lpips.mean(),
            'seg_dice': m.seg_dice.mean(), 'dx_kept': m.dx_kept.mean(), 'add_detected_before': add.detected_before.mean(),
            'add_detected_after': add.detected_after.mean(), 'remove_detected_after': rem.detected_after.mean()}


def show(row:dict, t0:float):
    "Print a result row, rounded, with the seconds since t0."
    import time
    print({k: (round(float(v), 4) if isinstance(v, float) else v) for k, v in row.items()}, f'{time.time() - t0:.0f} s', flush=True)
