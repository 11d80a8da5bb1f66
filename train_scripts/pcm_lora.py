"""Phased consistency distillation of an SD 1.x/2.x or SDXL teacher into a LoRA (PCM-LoRA), optionally adversarial.

    accelerate launch train_scripts/pcm_lora.py --pretrained_teacher_model=<folder or Hub id> \
        --train_data_dir=<images + metadata.jsonl> --output_dir=pcm-lora --multiphase=4 --max_train_steps=5000 \
        [--adv_weight=0.1 --adv_lr=1e-5]

Every flag: python train_scripts/pcm_lora.py --help
"""

import sys

from distill.cli import main

if __name__ == "__main__":
    sys.exit(main("pcm"))
