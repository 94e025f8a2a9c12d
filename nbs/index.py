# %% [markdown]
# # dermnb
#
# > Notebook-first diffusion models for dermoscopy: DiffSeg, CPDE, LesionGen and SkinDualGen on one shared backbone.

# %% [markdown]
# dermnb is a literate research package: ordered [nbdev](https://nbdev.fast.ai) notebooks in `nbs/` define, explain
# and test every component, and export the `dermnb` package. Paper figures are notebooks too (`nbs/figures/`), run
# with papermill into `figures/`, where the quick-profile results are committed so you can look before you run.
#
# | method | status | what it does |
# |---|---|---|
# | **DiffSeg** | built (`06_diffseg`); see the results for which variant clears the colour floor | weakly supervised lesion segmentation from the signed difference of predictions under "lesion" and "healthy skin" (shortcut-free weak labels; noise band, thresholds and the image-only mask priors, vignette excluded and the central component, chosen on a random sample of the training split), with multiple outputs, GED uncertainty, a guarded DenseCRF, the Wolleb-style translation variant (`diffseg-translation`: DDIM-invert under "lesion", sample back under "healthy skin"), and `diffseg-distilled`, a U-Net trained on the CRF labels of the consistent regions of whichever variant is better on the training split, then a second self-training round on its own flip-consistent regions |
# | **LesionGen** | built (`07_lesiongen`); see the results for where it falls short | concept-rich captions with provenance (expert, crowd, a concept classifier, measured morphology), text-to-image LoRA on the shared base, classifiers trained on synthetic images |
# | **CPDE** | built (`08_cpde`); see the results | context-preserving attribute editing in h-space (Asyrp-style) with one learned semantic module (SCT), mask-guided dual-branch training and background blending; Asyrp and DiffusionCLIP-style baselines |
# | **SkinDualGen** | built (`09_skindualgen`); see the results | one latent diffusion model (the base, widened by mask latents, LoRA) that generates an image and its lesion mask in one pass |
#
# All of them share one backbone, one notebook per concern, each using only the notebooks before it:
#
# | notebook | module | what |
# |---|---|---|
# | `00_core` | `dermnb.core` | profiles, configs with stable hashes, seeding, devices, atomic cache, image I/O and image↔tensor, listing images, plots, reading measured results |
# | `00a_pretrained` | `dermnb.pretrained` | the offline pretrained networks: EfficientNet-Lite0 (and its feature pyramid), MiniLM |
# | `01_data` | `dermnb.data` | ISIC 2017/2018/2019, PH2, Derm7pt, ENHANCE loaders; records, joins, leak-free splits, torch datasets |
# | `01a_captions` | `dermnb.captions` | captions from diagnosis, expert/crowd concepts and metadata; measured morphology; captions with provenance |
# | `01b_download` | `dermnb.download` | `dermnb data download/add/check`: checked, resumable downloads into the official layouts |
# | `02_metrics` | `dermnb.metrics` | Dice/IoU/ISIC thresholded Jaccard (checked against the official scorer), FID/KID, LPIPS-style and NS-LPIPS, GED |
# | `03_diffusion` | `dermnb.diffusion` | TAEF2/SD autoencoders, DDIM sampling and inversion, h-space hook, multi-condition noise prediction, LoRA, SD pipelines, the `Backbone` |
# | `03a_training` | `dermnb.training` | one diffusion trainer on `accelerate` (CPU, GPU, several GPUs or machines), cached by config |
# | `03b_base` | `dermnb.base` | the shared quick-profile base model, sampling, and its evaluation (FID/KID, pixel vs latent, inversion) |
# | `04_clip` | `dermnb.clip` | one CLIP interface, open_clip models by name and weights; S_dir and the directional CLIP loss |
# | `04a_dermclip` | `dermnb.dermclip` | DermCLIP, a dermoscopy CLIP trained here, its evaluation, and `load_clip` by name |
# | `05_segmenter` | `dermnb.segmenter` | supervised U-Net (pretrained EfficientNet-Lite0 encoder), training on masks or weighted pseudo-labels, Otsu and colour baselines, DenseCRF |
# | `06_diffseg` | `dermnb.diffseg` | DiffSeg: weak data, signed diffusion difference, calibration on the training split, guarded CRF, distilled student |
# | `07_lesiongen` | `dermnb.lesiongen` | LesionGen: concept classifier, caption dataset, LoRA (rich vs label-only), prompts, the classifier claim, faithfulness, FID per class, concept-aware DermCLIP |
# | `08_cpde` | `dermnb.cpde` | CPDE: asymmetric sampler, cached inversions, LPIPS rule, DeltaBlock and SCT, mask-guided training, DiffusionCLIP-style baseline, edit metrics |
# | `09_skindualgen` | `dermnb.skindualgen` | SkinDualGen: image+mask latents, multi-objective loss, pair generation, consistency, augmentation |
# | `10_runner`, `11_cli` | `dermnb.runner`, `dermnb.cli` | the papermill figure runner, the results table, and the `dermnb` command |
#
# ## Results
#
# Generated from the committed figure CSVs by `make readme` (never typed): each paper's claim, its number, and ours
# with the data it was measured on. Shortfalls are part of the table.
#
# <!-- results-table -->

# %% [markdown]
# ## Install and run
#
# You need Python ≥ 3.10. Three commands do everything, each creating `.venv` and installing the pinned dependencies
# on first use:
#
# ```sh
# make data       # downloads ISIC 2017/2018/2019, ENHANCE and the TAEF2 weights into $DERMNB_DATA (default ./data),
#                 # checked by size and sha256, resumable; prints the registration steps for PH2 and Derm7pt, which
#                 # end in `dermnb data add ph2 FILE` / `dermnb data add derm7pt FILE`
# make figures    # the main job: all paper figures, quick profile (PROFILE=full on a GPU); without data it says what to run
# make test       # every test: sync and layering checks, nbdev_test on all notebooks, pytest
# ```
#
# Already have the datasets in their official layouts (`data/README.md`)? Point `DERMNB_DATA` at them and skip
# `make data`; `dermnb data check` validates a root and names the command that fixes each problem.
#
# Other targets: `make lab` (JupyterLab on `nbs/` with jupytext pairing), `make sync` (after editing notebooks),
# `make figures FIGS=data_overview` (one figure). The command line has the same jobs:
#
# ```sh
# dermnb data download [--root DIR] [--datasets ...|all] [--dry-run] [--force]   # fetch the public datasets
# dermnb data add ph2|derm7pt FILE [--root DIR]              # unpack a downloaded registration-only archive
# dermnb data check [--root DIR]                            # layouts, counts, pairing, sizes, corrupt files
# dermnb data summary [--root DIR] [--json]                 # counts, splits, labels, concepts per dataset
# dermnb figures [NAME ...] --profile quick|full [--out figures/]
# dermnb eval seg --pred DIR --gt DIR [--json] [--csv F]   # Dice, Jaccard, thresholded Jaccard, ...
# dermnb eval fid DIR_A DIR_B [--json]                      # FID and KID on the standard Inception
# dermnb segment --method diffseg|diffseg-translation|diffseg-distilled|colour|unet|otsu --images DIR --out DIR [--crf/--no-crf] [--uncertainty]
# dermnb caption --dataset NAME|all --out FILE.jsonl           # concept-rich captions with provenance
# dermnb generate --method lesiongen --prompt TEXT --n N --out DIR [--seed S] [--guidance G] [--steps K]
# dermnb generate --method skindualgen --prompt TEXT --n N --out DIR   # SYN_xxxxxx.jpg + SYN_xxxxxx_segmentation.png pairs
# dermnb edit --images DIR [--masks DIR] --attribute NAME --direction add|remove --method cpde|asyrp|diffusionclip --out DIR [--strength K]
# dermnb eval edit --orig DIR --edited DIR --masks DIR --attribute NAME --direction add|remove [--json]
# dermnb train base --profile quick|full [--refresh]        # train (or refresh) the shared base model, with an ETA
# dermnb generate --method base --n N --out DIR [--seed S]  # sample it into PNGs (readable by dermnb eval fid)
# ```
#
# ## Training on GPUs or several machines
#
# The diffusion trainer runs on 🤗 accelerate, so the same command trains on one GPU, several GPUs or several machines
# with distributed data-parallel. The config's batch size is the global micro-batch, shared evenly by the processes, so
# the model does not depend on how many there are (up to float rounding). For the full profile's base model on 8 GPUs:
#
# ```sh
# .venv/bin/accelerate launch --multi_gpu --num_processes 8 --mixed_precision bf16 -m dermnb.cli train base --profile full
# ```
#
# (`accelerate config` once per machine sets these defaults, and `--num_machines`/`--machine_rank`/`--main_process_ip`
# span machines.) Only the main process writes checkpoints and the cache entry.
#
# Profiles: `quick` runs on a CPU in minutes with small models trained here on the real data; `full` uses a GPU,
# paper settings and pretrained models (Stable Diffusion, CLIP) that you download yourself. Trained models are cached
# by config under `$DERMNB_CACHE` (default `~/.cache/dermnb`): the first `make figures` trains the quick models (the
# longest step; `figures/README.md` records what each figure took), later runs reuse them. Quick models train for a
# fixed number of steps or epochs, not minutes, so a config gives the same model on a slow or a busy machine (up to
# floating-point rounding across CPUs).

# %% [markdown]
# ## A first look

# %%
from dermnb.data import get_split, DermDataset, LABELS
train = get_split('isic2018_task1', 'train')          # leak-free, saved split
ds = DermDataset(train, size=64, fit='pad', augment=True)
item = ds[0]
print(len(train), item['image'].shape, item['mask'].shape, LABELS[item['label']] if item['label'] >= 0 else 'unlabelled')

# %% [markdown]
# ## Layout
#
# - `settings.ini`: the nbdev configuration and pinned dependencies.
# - `nbs/`: the notebooks (each paired with a `py:percent` file for review); `nbs/figures/`: the paper-figure notebooks.
# - `dermnb/`: the package, generated by `nbdev_export`; never edit it by hand.
# - `data/`: explains the dataset layouts; its contents are git-ignored.
# - `figures/`: what `make figures` writes, indexed in `figures/README.md`.
# - `tests/`: pytest integration and CLI tests; `benchmarks/`: speed and memory scripts that print ratios.
#
# See `CONTRIBUTING.md` for the development loop.
