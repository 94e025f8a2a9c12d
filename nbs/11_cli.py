# %% [markdown]
# # Command line
#
# > `dermnb data summary`, `dermnb figures`, `dermnb eval ...`: thin commands over the notebooks' functions.

# %%
#| default_exp cli

# %%
#| export
from __future__ import annotations
import sys, os, json, argparse
from pathlib import Path
from dermnb.core import DermnbError, PROFILES

# %%
from fastcore.test import test_eq, test_fail
import io, contextlib


# %% [markdown]
# ## Data summary
#
# `dermnb data summary` prints the counts per dataset and split and the label and concept distributions; `--json`
# prints one JSON object keyed by dataset, for scripts and CI. A dataset that cannot be read is reported with the
# expected layout (on stderr and in its `error` field), and the exit status is 1.

# %%
#| export
def _fmt_counts(d:dict, # {value: count} or {value: {k: v}}
                width:int=78 # line width
               )->str:
    "Render a {value: count} dict on wrapped lines."
    items = ', '.join(f'{k} {v}' if not isinstance(v, dict) else f"{k} ({', '.join(f'{a}={b}' for a, b in v.items())})" for k, v in d.items())
    import textwrap
    return textwrap.fill(items, width, initial_indent='    ', subsequent_indent='    ')


# %%
#| export
def cmd_data_summary(args # parsed arguments: root, seed, json
                    )->int:
    "Print dataset counts, splits, labels and concepts."
    from dermnb.data import data_summary
    s = data_summary(args.root, args.seed)
    errors = {k: v['error'] for k, v in s.items() if 'error' in v}
    for k, e in errors.items(): print(f'dermnb: {k}: {e}', file=sys.stderr)
    if args.json: print(json.dumps(s, indent=2)); return 1 if errors else 0
    for name, v in s.items():
        head = f"{name}: {v['images']} images" + (f", {v['masks']} masks" if 'masks' in v else '')
        if v.get('skipped'): head += f", {v['skipped']} skipped"
        print(head)
        if 'error' in v: print(f"    error: {v['error']}"); continue
        if 'splits' in v: print('  splits:', ', '.join(f'{k} {n}' for k, n in v['splits'].items()))
        if 'diagnosis' in v: print('  diagnosis:'); print(_fmt_counts(v['diagnosis']))
        for c, counts in v.get('concepts', {}).items(): print(f'  concept {c}:'); print(_fmt_counts(counts))
        for k in ('with_isic2018_task1_image', 'isic', 'ph2', 'raters'):
            if k in v: print(f'  {k}: {v[k]}')
    return 1 if errors else 0


# %% [markdown]
# ## Getting the data
#
# `dermnb data download` fills a data root with the public datasets in the official layouts (resumable, checked
# against the source table of `dermnb.download`) and prints the registration steps for PH2 and Derm7pt;
# `dermnb data add ph2|derm7pt FILE` unpacks what the user downloaded there; `dermnb data check` validates a root and
# prints, per dataset, what is wrong and the command that fixes it. A failing download makes the exit status 1 and
# the other datasets still download; `check` exits 1 when any dataset is not ok.

# %%
#| export
def cmd_data_download(args # parsed `dermnb data download` arguments
                      )->int:
    "Download the public datasets into the data root; print the steps for those behind registration."
    from dermnb.download import download
    rep = download(args.datasets, args.root, force=args.force, dry_run=args.dry_run, keep_archives=args.keep_archives,
                   keep_going=True, progress=not args.quiet)
    bad = [r for r in rep if r['status'] == 'failed']
    todo = sorted({r['dataset'] for r in rep if r['status'] == 'needs registration'})
    if not args.dry_run: print(f"download: {len(rep) - len(bad)} ok, {len(bad)} failed" + (f"; by registration: {', '.join(todo)} (see above)" if todo else ''))
    return 1 if bad else 0

def cmd_data_add(args # parsed `dermnb data add` arguments
                 )->int:
    "Unpack a dataset downloaded after registration (ph2, derm7pt) into the data root."
    from dermnb.download import add_dataset
    add_dataset(args.dataset, args.file, args.root, force=args.force); return 0

def cmd_data_check(args # parsed `dermnb data check` arguments
                   )->int:
    "Validate a data root per dataset and print the fixes."
    from dermnb.download import check_root, format_check
    res = check_root(args.root, args.datasets, deep=not args.quick, progress=not args.quiet and not args.json)
    print(json.dumps(res, indent=2) if args.json else format_check(res))
    return 0 if all(r['status'] == 'ok' for r in res.values()) else 1


# %% [markdown]
# ## Figures
#
# `dermnb figures [NAME ...] --profile quick|full` runs the paper-figure notebooks through papermill and updates
# `figures/README.md`. A failing notebook makes the exit status non-zero, names the notebook and cell, and the other
# figures still run.

# %%
#| export
def cmd_figures(args # parsed arguments: names, profile, out, root, seed, device, list, quiet
               )->int:
    "Run paper-figure notebooks and report failures."
    from dermnb.runner import run_figures, figure_notebooks
    if args.list:
        for n, p in figure_notebooks().items(): print(f'{n}\t{p}')
        return 0
    res = run_figures(args.names or None, args.profile, args.out, args.root, args.seed, args.device, progress=not args.quiet)
    bad = [r for r in res if r['status'] != 'ok']
    print(f"figures: {len(res) - len(bad)} ok, {len(bad)} failed; index: {Path(args.out)/'README.md'}")
    for r in bad: print(f"FAILED {r['name']}: {r['error']}", file=sys.stderr)
    return 1 if bad else 0


# %% [markdown]
# ## Evaluation
#
# `dermnb eval seg --pred DIR --gt DIR` scores a folder of predicted masks against ground truth, matching
# `<id>_segmentation.png` on both sides (the ISIC naming, which `dermnb segment` writes); `dermnb eval fid DIR_A DIR_B`
# compares two image folders with FID and KID on the standard Inception. Both print a readable line, or JSON with
# `--json`. Any missing/extra file, size mismatch or non-binary mask is an error naming the file.

# %%
#| export
def _print_result(res:dict, # flat result
                  as_json:bool # print JSON instead of aligned lines
                 ):
    "Print a flat result dict as JSON or as `key value` lines."
    if as_json: print(json.dumps(res, indent=2)); return
    for k, v in res.items(): print(f'{k:>18} {v:.4f}' if isinstance(v, float) else f'{k:>18} {v}')

def cmd_eval_seg(args # parsed arguments: pred, gt, csv, json
                )->int:
    "Segmentation metrics of a prediction folder against ground truth."
    from dermnb.metrics import eval_seg_folders
    res = eval_seg_folders(args.pred, args.gt, csv=args.csv)
    _print_result({k: res[k] for k in ('dice', 'jaccard', 'threshold_jaccard', 'precision', 'recall', 'n')} | res, args.json)
    return 0


# %%
#| export
def cmd_eval_fid(args # parsed arguments: dir_a, dir_b, device, json
                )->int:
    "FID and KID between two image folders."
    from dermnb.metrics import eval_fid_folders
    _print_result(eval_fid_folders(args.dir_a, args.dir_b, device=args.device), args.json); return 0


# %% [markdown]
# ## Segmentation
#
# `dermnb segment --method diffseg|diffseg-translation|diffseg-distilled|colour|unet|otsu --images DIR --out DIR` writes
# `<stem>_segmentation.png` (0/255, the input size; ISIC names stay ISIC names) for every image, readable by
# `dermnb eval seg`. Models are trained and cached on the data root the first time they are needed, with progress
# shown. `--uncertainty` (DiffSeg and its distilled student) adds the ambiguity maps and `uncertainty.csv`, the
# per-image GED diversity of the outputs.

# %%
#| export
SEGMENT_METHODS = ('diffseg', 'diffseg-translation', 'diffseg-distilled', 'colour', 'unet', 'otsu')

def cmd_segment(args # parsed arguments: method, images, out, profile, root, device, crf, uncertainty
               )->int:
    "Segment a folder of images with DiffSeg, its distilled student, the colour or Otsu baseline, or the U-Net."
    from dermnb.diffseg import (segment_folder, otsu_method, colour_method, unet_method, load_diffseg, diffseg_method,
                                load_distilled, distilled_method, load_translation)
    if args.method == 'otsu': fn = otsu_method
    elif args.method == 'colour': fn = colour_method
    elif args.method == 'unet':
        from dermnb.segmenter import load_segmenter, SegmenterConfig
        print('loading the supervised U-Net (trained and cached on first use) ...', file=sys.stderr)
        fn = unet_method(load_segmenter(SegmenterConfig.for_profile(args.profile), args.root, args.device))
    elif args.method == 'diffseg-distilled':
        print('loading diffseg-distilled (DiffSeg and its student are trained and cached on first use) ...', file=sys.stderr)
        fn = distilled_method(load_distilled(args.profile, args.root, args.device))
    elif args.method == 'diffseg-translation':
        print('loading the DiffSeg translation variant (trained and calibrated on first use) ...', file=sys.stderr)
        fn = diffseg_method(load_translation(args.profile, args.root, args.device), crf=args.crf)
    else:
        print('loading DiffSeg (trained and calibrated on first use) ...', file=sys.stderr)
        fn = diffseg_method(load_diffseg(args.profile, args.root, args.device), crf=args.crf)
    unc = args.uncertainty and args.method.startswith('diffseg')
    if args.uncertainty and not unc: print('note: --uncertainty applies to the diffseg methods only', file=sys.stderr)
    tab = segment_folder(fn, args.images, args.out, uncertainty=unc)
    print(f'segment: {len(tab)} masks written to {args.out}')
    return 0


# %% [markdown]
# ## Base models: training and sampling
#
# `dermnb train base` trains (or, with `--refresh`, retrains) the shared base model of a profile through the cache,
# with progress and ETA bars; `dermnb generate --method base --n N --out DIR` samples it unconditionally (the empty
# caption) into a folder of PNGs that `dermnb eval fid` reads.

# %%
#| export
def cmd_train_base(args # parsed arguments: profile, root, seed, device, refresh
                  )->int:
    "Train or refresh the cached base model of a profile (one process, or several under `accelerate launch`)."
    from dermnb.base import base_config, base_dataset, load_base_model
    from dermnb.training import train_cached
    if args.profile == 'full': load_base_model('full', device=args.device); print('full profile: Stable Diffusion found'); return 0
    cfg = base_config(args.profile, args.seed)
    print(f'base model {cfg.hash()}: {cfg.space} {cfg.cond}-conditional, {cfg.image_size} px, {cfg.steps} steps of {cfg.batch_size} '
          f'(about {PROFILES[args.profile].train_minutes:g} min on 2 CPU cores; safety cap {cfg.max_minutes:g} min)', file=sys.stderr)
    path = train_cached(cfg, lambda: base_dataset(cfg.image_size, 'train', args.root, args.seed), device=args.device, refresh=args.refresh)
    print(f'base model cached at {path}')
    return 0


# %%
#| export
def cmd_generate(args # parsed arguments: method, prompt, n, out, seed, guidance, steps, captions, profile, root, device
                )->int:
    "Sample a model into a folder: the base model, LesionGen (images) or SkinDualGen (image + mask pairs), trained on first use."
    from dermnb.core import save_image
    if args.n <= 0: raise DermnbError(f"--n must be a positive number of images, not {args.n}")
    out = Path(args.out); out.mkdir(parents=True, exist_ok=True)
    if args.method == 'skindualgen':
        from dermnb.skindualgen import load_skindualgen, generate_skindualgen
        if args.prompt is None: raise DermnbError("--method skindualgen needs --prompt, e.g. --prompt 'dermoscopy of a melanoma'")
        print('loading SkinDualGen (trained and cached on first use) ...', file=sys.stderr)
        flags = generate_skindualgen(load_skindualgen(args.profile, root=args.root, device=args.device), args.prompt, args.n, out,
                                     args.seed, args.guidance, args.steps)
        bad = flags[flags.flag.fillna('') != '']
        print(f'generate: {len(flags)} image/mask pairs written to {out} ({len(bad)} flagged in flags.csv: empty or full masks)')
        return 0
    if args.method == 'lesiongen':
        from dermnb.lesiongen import load_lesiongen, generate_lesiongen
        if args.prompt is None: raise DermnbError("--method lesiongen needs --prompt, e.g. --prompt 'dermoscopy of a melanoma with streaks'")
        print(f'loading LesionGen ({args.captions} captions; trained and cached on first use) ...', file=sys.stderr)
        bb = load_lesiongen(args.profile, args.captions, args.root, args.device)
        x = generate_lesiongen(bb, args.prompt, args.n, out, args.seed, args.guidance, args.steps)
    else:
        from dermnb.base import load_base_model, generate
        if args.prompt is not None and not args.prompt.strip(): raise DermnbError("empty --prompt; leave it out to sample unconditionally")
        bb = load_base_model(args.profile, args.root, device=args.device)
        x = generate(bb, [args.prompt or ''] * args.n, args.guidance, args.steps, seed=args.seed)
        for i, im in enumerate(x): save_image(((im.float().cpu() + 1) / 2).clamp(0, 1), out/f'base_{args.seed}_{i:05d}.png')
    print(f'generate: {len(x)} images written to {out}')
    return 0


# %% [markdown]
# ## Editing
#
# `dermnb edit --images DIR [--masks DIR] --attribute NAME --direction add|remove --method cpde|asyrp|diffusionclip --out DIR`
# edits every image and writes the results under the input names (`--strength` scales the h-space edit, as Asyrp's
# `hs_coeff_delta_h`); without `--masks` it segments with
# `diffseg-distilled` (or `--mask-method`). Editors train and cache on first use, with progress. `dermnb eval edit`
# scores an edited folder against its originals: `fid`, `s_dir`, `ns_lpips`, `n`.

# %%
#| export
def cmd_edit(args # parsed arguments: images, masks, attribute, direction, method, out, mask_method, profile, root, device, seed, strength
            )->int:
    "Edit a folder of images (CPDE or a baseline)."
    from dermnb.cpde import edit_folder, Edit
    Edit(args.attribute, args.direction)                      # an unknown attribute fails before any model loads
    print(f'loading the {args.method} editor (trained and cached on first use) ...', file=sys.stderr)
    files = edit_folder(args.images, args.out, args.attribute, args.direction, args.method, args.masks, args.mask_method,
                        args.profile, args.root, args.device, args.seed, args.strength)
    print(f'edit: {len(files)} edited images written to {args.out}')
    return 0


# %%
#| export
def cmd_eval_edit(args # parsed arguments: orig, edited, masks, attribute, direction, json, profile, root, device
                 )->int:
    "FID, S_dir and NS-LPIPS of edited images against their originals."
    from dermnb.cpde import eval_edit_folders
    _print_result(eval_edit_folders(args.orig, args.edited, args.masks, args.attribute, args.direction, profile=args.profile,
                                    root=args.root, device=args.device), args.json)
    return 0


# %% [markdown]
# ## Captions
#
# `dermnb caption --dataset NAME|all --out FILE.jsonl` writes LesionGen's concept-rich captions with provenance for
# every image of the dataset(s), all splits, one JSON object per line (id, source, split, caption, captions,
# label_caption, phrases with their provenance, dropped phrases, tokens, mask source, measures). The concept
# classifier and, for datasets without masks, the U-Net are trained and cached on first use.

# %%
#| export
def cmd_caption(args # parsed arguments: dataset, out, root, device
               )->int:
    "Write concept-rich captions with provenance as JSONL."
    from dermnb.lesiongen import caption_dataset, CaptionConfig, CAPTION_DATASETS
    from dermnb.core import atomic_write
    ds = CAPTION_DATASETS if args.dataset == 'all' else tuple(args.dataset.split(','))
    bad = [d for d in ds if d not in CAPTION_DATASETS]
    if bad: raise DermnbError(f"unknown dataset(s) {bad}; choose from {list(CAPTION_DATASETS)} or 'all'")
    rows = []
    for d in ds: rows += caption_dataset(CaptionConfig(datasets=(d,), splits=('train', 'val', 'test')), args.root, args.device)
    with atomic_write(args.out, 'w') as f:
        for r in rows: f.write(json.dumps(r) + '\n')
    print(f'caption: {len(rows)} captions written to {args.out}')
    return 0


# %% [markdown]
# ## The parser
#
# Every subcommand is one function taking the parsed arguments. `main` turns the errors users can cause
# (`DermnbError`: bad data, absent weights, unknown names) into one line on stderr and exit status 2, instead of a
# traceback.

# %%
#| export
def build_parser()->argparse.ArgumentParser:
    "The `dermnb` argument parser with all subcommands."
    p = argparse.ArgumentParser(prog='dermnb', description='Diffusion models for dermoscopy: data, figures, evaluation.')
    sub = p.add_subparsers(dest='cmd', required=True)

    data = sub.add_parser('data', help='dataset utilities').add_subparsers(dest='data_cmd', required=True)
    s = data.add_parser('summary', help='counts per dataset and split, label and concept distributions')
    s.add_argument('--root', help='data root (default $DERMNB_DATA)'); s.add_argument('--seed', type=int, default=0)
    s.add_argument('--json', action='store_true', help='print one JSON object keyed by dataset')
    s.set_defaults(fn=cmd_data_summary)
    s = data.add_parser('download', help='download the public datasets into the data root, in the official layouts')
    s.add_argument('--root', help='data root to fill (default $DERMNB_DATA; created if missing)')
    s.add_argument('--datasets', default='all', help='comma-separated isic2018_task1,isic2017,isic2019,ph2,derm7pt,enhance,taef2, or all')
    s.add_argument('--dry-run', action='store_true', help='list what would be fetched, with sizes, and download nothing')
    s.add_argument('--force', action='store_true', help='download again and replace files that are already present')
    s.add_argument('--keep-archives', action='store_true', help='keep the zip archives under ROOT/.download after unpacking')
    s.add_argument('--quiet', action='store_true', help='no progress bars')
    s.set_defaults(fn=cmd_data_download)
    s = data.add_parser('add', help='unpack PH2 or Derm7pt, downloaded after registering, into the data root')
    s.add_argument('dataset', choices=['ph2', 'derm7pt']); s.add_argument('file', help='the downloaded archive, or its unpacked folder')
    s.add_argument('--root', help='data root (default $DERMNB_DATA; created if missing)')
    s.add_argument('--force', action='store_true', help='replace the dataset if it is already there')
    s.set_defaults(fn=cmd_data_add)
    s = data.add_parser('check', help='validate a data root: layouts, counts, pairing, sizes, corrupt files; prints the fixes')
    s.add_argument('--root', help='data root (default $DERMNB_DATA)'); s.add_argument('--datasets', default='all', help='comma-separated keys, or all')
    s.add_argument('--quick', action='store_true', help='read file headers only, without decoding the images')
    s.add_argument('--json', action='store_true', help='print one JSON object keyed by dataset'); s.add_argument('--quiet', action='store_true')
    s.set_defaults(fn=cmd_data_check)

    f = sub.add_parser('figures', help='run the paper-figure notebooks with papermill')
    f.add_argument('names', nargs='*', help='figure names (default: all)')
    f.add_argument('--profile', choices=sorted(PROFILES), default='quick')
    f.add_argument('--out', default='figures', help='output folder (default figures/)')
    f.add_argument('--root', help='data root (default $DERMNB_DATA)'); f.add_argument('--seed', type=int, default=0)
    f.add_argument('--device', default='auto', help="'auto', 'cpu' or 'cuda'")
    f.add_argument('--list', action='store_true', help='list the figure notebooks and exit')
    f.add_argument('--quiet', action='store_true', help='no per-cell progress bars')
    f.set_defaults(fn=cmd_figures)

    ev = sub.add_parser('eval', help='evaluate predictions or generated images').add_subparsers(dest='eval_cmd', required=True)
    e = ev.add_parser('seg', help='segmentation metrics: <id>_segmentation.png in --pred vs --gt')
    e.add_argument('--pred', required=True, help='folder of predicted masks'); e.add_argument('--gt', required=True, help='folder of ground-truth masks')
    e.add_argument('--csv', help='also write the per-image table here'); e.add_argument('--json', action='store_true')
    e.set_defaults(fn=cmd_eval_seg)
    e = ev.add_parser('edit', help='fid, s_dir, ns_lpips of edited images against their originals')
    e.add_argument('--orig', required=True); e.add_argument('--edited', required=True); e.add_argument('--masks', required=True)
    e.add_argument('--attribute', required=True); e.add_argument('--direction', choices=['add', 'remove'], required=True)
    e.add_argument('--json', action='store_true'); e.add_argument('--profile', choices=sorted(PROFILES), default='quick')
    e.add_argument('--root'); e.add_argument('--device', default='auto')
    e.set_defaults(fn=cmd_eval_edit)
    e = ev.add_parser('fid', help='FID and KID (standard Inception) between two image folders')
    e.add_argument('dir_a'); e.add_argument('dir_b'); e.add_argument('--device', default='auto'); e.add_argument('--json', action='store_true')
    e.set_defaults(fn=cmd_eval_fid)

    g = sub.add_parser('segment', help='segment a folder of images (<stem>_segmentation.png, input size)')
    g.add_argument('--method', choices=list(SEGMENT_METHODS), default='diffseg')
    g.add_argument('--images', required=True, help='input image folder'); g.add_argument('--out', required=True, help='output folder')
    g.add_argument('--profile', choices=sorted(PROFILES), default='quick'); g.add_argument('--root', help='data root for training (default $DERMNB_DATA)')
    g.add_argument('--device', default='auto')
    g.add_argument('--crf', action=argparse.BooleanOptionalAction, default=True, help='DenseCRF refinement (diffseg, diffseg-translation)')
    g.add_argument('--uncertainty', action='store_true', help='also write ambiguity maps and uncertainty.csv (diffseg, diffseg-distilled)')
    g.set_defaults(fn=cmd_segment)

    tr = sub.add_parser('train', help='train cached models').add_subparsers(dest='train_cmd', required=True)
    t = tr.add_parser('base', help='train or refresh the shared base model of a profile')
    t.add_argument('--profile', choices=sorted(PROFILES), default='quick'); t.add_argument('--root'); t.add_argument('--seed', type=int, default=0)
    t.add_argument('--device', default='auto'); t.add_argument('--refresh', action='store_true', help='retrain even if cached')
    t.set_defaults(fn=cmd_train_base)
    gen = sub.add_parser('generate', help='sample a model into a folder of PNGs')
    gen.add_argument('--method', choices=['base', 'lesiongen', 'skindualgen'], default='base'); gen.add_argument('--n', type=int, required=True)
    gen.add_argument('--prompt', help='text prompt (lesiongen, skindualgen: required; base: default unconditional)')
    gen.add_argument('--guidance', type=float, default=4., help='classifier-free guidance (default 4)')
    gen.add_argument('--steps', type=int, default=20, help='DDIM steps (default 20)')
    gen.add_argument('--captions', choices=['rich', 'label'], default='rich', help="lesiongen: which LoRA of the ablation")
    gen.add_argument('--out', required=True); gen.add_argument('--seed', type=int, default=0)
    gen.add_argument('--profile', choices=sorted(PROFILES), default='quick'); gen.add_argument('--root'); gen.add_argument('--device', default='auto')
    gen.set_defaults(fn=cmd_generate)
    ed = sub.add_parser('edit', help='edit dermoscopic attributes of a folder of images (CPDE or a baseline)')
    ed.add_argument('--images', required=True); ed.add_argument('--masks', help='<stem>_segmentation.png masks (default: segment)')
    ed.add_argument('--attribute', required=True, help='streaks, blue_whitish_veil, pigment_network, dots_and_globules, regression_structures')
    ed.add_argument('--direction', choices=['add', 'remove'], required=True)
    ed.add_argument('--method', choices=['cpde', 'asyrp', 'masking', 'sct', 'diffusionclip'], default='cpde')
    ed.add_argument('--mask-method', dest='mask_method', choices=['diffseg-distilled', 'unet'], default='diffseg-distilled')
    ed.add_argument('--out', required=True); ed.add_argument('--profile', choices=sorted(PROFILES), default='quick')
    ed.add_argument('--root'); ed.add_argument('--device', default='auto'); ed.add_argument('--seed', type=int, default=0)
    ed.add_argument('--strength', type=float, default=1., help="scale of the h-space edit at sampling (Asyrp's hs_coeff_delta_h; >1 stronger)")
    ed.set_defaults(fn=cmd_edit)
    c = sub.add_parser('caption', help='concept-rich captions with provenance, as JSONL')
    c.add_argument('--dataset', required=True, help="isic2018_task1, isic2019, ph2, derm7pt (comma-separated) or 'all'")
    c.add_argument('--out', required=True, help='output .jsonl'); c.add_argument('--root'); c.add_argument('--device', default='auto')
    c.set_defaults(fn=cmd_caption)
    return p


# %%
#| export
def main(argv:list|None=None # arguments (default sys.argv[1:])
        )->int:
    "Entry point of the `dermnb` command."
    args = build_parser().parse_args(argv)
    try: return args.fn(args)
    except DermnbError as e:
        print(f'dermnb: error: {e}', file=sys.stderr); return 2


# %% [markdown]
# `python -m dermnb.cli ...` runs the same command; that is the form `accelerate launch -m dermnb.cli train base ...`
# uses to train on several GPUs or machines (each process runs the CLI; the trainer shares the work). The guard skips
# notebook kernels and nbdev_test's IPython shell, where `__name__` is `'__main__'` too.

# %%
#| export
if __name__ == '__main__' and 'IPython' not in sys.modules: sys.exit(main())

# %%
out, err = io.StringIO(), io.StringIO()
with contextlib.redirect_stdout(out): rc = main(['data', 'summary', '--json'])
s = json.loads(out.getvalue())
test_eq(rc, 0)
test_eq({k: s[k]['images'] for k in ('isic2018_task1', 'ph2', 'derm7pt', 'isic2019')},
        {'isic2018_task1': 2294, 'ph2': 200, 'derm7pt': 1010, 'isic2019': 5984})
test_eq((s['isic2018_task1']['masks'], s['ph2']['masks']), (2294, 200))
with contextlib.redirect_stderr(err): rc = main(['data', 'summary', '--root', '/no/such/root'])
test_eq(rc, 2); assert '/no/such/root' in err.getvalue()
out = io.StringIO()
with contextlib.redirect_stdout(out): main(['data', 'summary'])
assert 'isic2018_task1: 2294 images, 2294 masks' in out.getvalue()

# %% [markdown]
# `eval seg` on real ISIC masks: ground truth against itself is perfect; a missing prediction names the file.

# %%
import shutil, tempfile
from pathlib import Path
from dermnb.core import data_root
gt_src = sorted((data_root()/'isic2018_task1'/'ISIC2018_Task1_Training_GroundTruth').glob('*_segmentation.png'))[:5]
with tempfile.TemporaryDirectory() as d:
    d = Path(d); (d/'gt').mkdir(); [shutil.copy(f, d/'gt') for f in gt_src]
    out = io.StringIO()
    with contextlib.redirect_stdout(out): rc = main(['eval', 'seg', '--pred', str(d/'gt'), '--gt', str(d/'gt'), '--json', '--csv', str(d/'t.csv')])
    r = json.loads(out.getvalue())
    test_eq((rc, r['dice'], r['threshold_jaccard'], r['n']), (0, 1.0, 1.0, 5)); assert (d/'t.csv').exists()
    shutil.copytree(d/'gt', d/'pred'); (d/'pred'/gt_src[2].name).unlink()
    err = io.StringIO()
    with contextlib.redirect_stderr(err): rc = main(['eval', 'seg', '--pred', str(d/'pred'), '--gt', str(d/'gt')])
    test_eq(rc, 2); assert gt_src[2].name in err.getvalue()

# %%
p = build_parser()
a = p.parse_args(['generate', '--method', 'base', '--n', '4', '--out', 'x', '--seed', '3'])
test_eq((a.fn, a.n, a.seed, a.profile), (cmd_generate, 4, 3, 'quick'))
test_eq(p.parse_args(['train', 'base', '--refresh']).fn, cmd_train_base)
a = p.parse_args(['edit', '--images', 'i', '--attribute', 'streaks', '--direction', 'add', '--out', 'o', '--strength', '2'])
test_eq((a.fn, a.method, a.strength, a.mask_method), (cmd_edit, 'cpde', 2., 'diffseg-distilled'))

# %% [markdown]
# The data commands parse, `check` passes on the shared root's ENHANCE and TAEF2 files, and `add` names a missing file in one line
# (the download itself is tested offline, against a local server, in `tests/test_download.py`).

# %%
a = p.parse_args(['data', 'download', '--datasets', 'enhance,taef2', '--dry-run'])
test_eq((a.fn, a.datasets, a.dry_run, a.force), (cmd_data_download, 'enhance,taef2', True, False))
test_eq(p.parse_args(['data', 'add', 'ph2', 'PH2Dataset.rar']).fn, cmd_data_add)
out = io.StringIO()
with contextlib.redirect_stdout(out): rc = main(['data', 'check', '--datasets', 'enhance,taef2', '--quiet'])
test_eq(rc, 0); assert 'enhance' in out.getvalue() and 'all datasets ok' in out.getvalue()
err = io.StringIO()
with contextlib.redirect_stderr(err): rc = main(['data', 'add', 'ph2', '/no/such/PH2Dataset.rar', '--root', '/tmp/x'])
test_eq(rc, 2); assert 'PH2Dataset.rar: file not found' in err.getvalue()
