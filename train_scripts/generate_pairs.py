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
import sys

from distill.cli import add_dataclass_flags, parse_with_config, pick, run_command
from distill.pair_generation import PairGenerationConfig, generate_pairs


def parse_args(argv=None) -> PairGenerationConfig:
    """The command line (and its --config file) as a PairGenerationConfig, flags built as for the trainers."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_dataclass_flags(parser, PairGenerationConfig, set())
    return pick(PairGenerationConfig, parse_with_config(parser, argv))


def main(argv=None) -> int:
    return run_command(lambda: print(f"Pairs written to {generate_pairs(parse_args(argv))}"))


if __name__ == "__main__":
    sys.exit(main())
