"""Turn prompts into (initial noise, teacher sample) pairs for Rectified Diffusion (Wang et al. 2024, Algorithm 4).

    python train_scripts/generate_pairs.py --pretrained_teacher_model=<SD/SDXL folder or Hub id> \
        --prompts_file=prompts.txt --output_dir=pairs --num_samples=100000

The teacher (its stock pipeline with multistep DPM-Solver++, 25 steps, classifier-free guidance) maps each noise
to a latent; pairs go to resumable safetensors shards. An interrupted run started again with the same arguments
skips the complete shards and makes exactly the pairs an uninterrupted run makes. Train on the folder with
train_scripts/rectified_diffusion.py --pairs_dir=pairs.

Every flag: python train_scripts/generate_pairs.py --help
"""

import argparse
import dataclasses
import logging
import sys

from distill.errors import DistillError
from distill.pairs import PairGenerationConfig, generate_pairs

HELP = {
    "pretrained_teacher_model": "Teacher: a local SD 1.x/2.x or SDXL diffusers folder, or a Hub id.",
    "output_dir": "Folder of the pair shards; rerun with the same arguments to resume an interrupted run.",
    "prompts_file": "A .txt file, one prompt per line.",
    "dataset_name": "A Hugging Face dataset (name or save_to_disk folder) whose --caption_column holds prompts.",
    "train_data_dir": "A local image folder with metadata.jsonl (or .tar shards) whose captions are the prompts.",
    "caption_column": "The column holding the prompts.",
    "num_samples": "Number of pairs (prompts are cycled); default: one per prompt.",
    "num_inference_steps": "Steps of the teacher's DPM-Solver++.",
    "guidance_scale": "Classifier-free guidance scale of the teacher (1 disables guidance).",
    "resolution": "Image size; default: the teacher's native size.",
    "seed": "Sample i's noise is drawn from a generator seeded by (seed, i).",
    "shard_size": "Pairs per shard file (the unit of resuming).",
    "batch_size": "Pairs per teacher call.",
}


INT_OR_NONE = {"num_samples": int, "resolution": int}


def parse_args(argv=None) -> PairGenerationConfig:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for field in dataclasses.fields(PairGenerationConfig):
        kind = INT_OR_NONE.get(field.name) or (str if field.default is None else type(field.default))
        parser.add_argument(f"--{field.name}", type=kind, default=field.default,
                            help=f"{HELP[field.name]} (default: {field.default})")
    return PairGenerationConfig(**vars(parser.parse_args(argv)))


def main(argv=None) -> int:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    try:
        folder = generate_pairs(parse_args(argv))
    except DistillError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"Pairs written to {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
