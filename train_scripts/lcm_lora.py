"""Latent consistency distillation of an SD 1.x/2.x or SDXL teacher into a LoRA (LCM-LoRA).

    accelerate launch train_scripts/lcm_lora.py --pretrained_teacher_model=<folder or Hub id> \
        --train_data_dir=<images + metadata.jsonl> --output_dir=lcm-lora --max_train_steps=1000

Every flag: python train_scripts/lcm_lora.py --help
"""

import sys

from distill.cli import main

if __name__ == "__main__":
    sys.exit(main("lcm"))
