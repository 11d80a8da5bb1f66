"""Rectified Diffusion: retrain an SD 1.x/2.x or SDXL teacher on its own noise-sample pairs (Wang et al. 2024).

    python train_scripts/generate_pairs.py --pretrained_teacher_model=<teacher> --prompts_file=prompts.txt \
        --output_dir=pairs --num_samples=100000
    accelerate launch train_scripts/rectified_diffusion.py --pretrained_teacher_model=<teacher> \
        --pairs_dir=pairs --output_dir=rectified-lora --max_train_steps=10000

Variants: --rectified_variant pairs (default, Algorithm 4), phased (online teacher trajectories inside
--num_phases phases, trained on --train_data_dir/--dataset_name images; no pairs) or consistency (consistency
distillation along each pair's first-order ODE). LoRA by default; --full_finetune [--use_ema --ema_decay 0.9999]
trains the whole UNet. The student samples with DDIMScheduler (trailing timesteps).

Every flag: python train_scripts/rectified_diffusion.py --help
"""

import sys

from distill.cli import main

if __name__ == "__main__":
    sys.exit(main("rectified"))
