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

from distill.cli import with_default
from distill.errors import DistillError
from distill.pairs import PairGenerationConfig, generate_pairs

INT_OR_NONE = {"num_samples": int, "resolution": int}


def parse_args(argv=None) -> PairGenerationConfig:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for field in dataclasses.fields(PairGenerationConfig):
        kind = INT_OR_NONE.get(field.name) or (str if field.default is None else type(field.default))
        parser.add_argument(f"--{field.name}", type=kind, default=field.default,
                            help=with_default(field.metadata["help"], field.default))
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
