"""UFOGen: distil an SD 1.x/2.x or SDXL teacher into a one-step diffusion-GAN generator (a LoRA on its UNet).

    accelerate launch train_scripts/ufogen.py --pretrained_teacher_model=<folder or Hub id> \
        --train_data_dir=<images + metadata.jsonl> --output_dir=ufogen-lora --max_train_steps=1000

The discriminator (frozen teacher encoder + trainable heads) has its own optimizer, "discriminator", with its own
learning rate (default 1e-4; --learning_rates discriminator=<lr> to change it). Every flag:
python train_scripts/ufogen.py --help
"""

import sys

from distill.cli import main

if __name__ == "__main__":
    sys.exit(main("ufogen"))
