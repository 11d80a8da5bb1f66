"""UFOGen: distil an SD 1.x/2.x or SDXL teacher into a one-step diffusion-GAN generator (a LoRA on its UNet).

    accelerate launch train_scripts/ufogen.py --pretrained_teacher_model=<folder or Hub id> \
        --train_data_dir=<images + metadata.jsonl> --output_dir=ufogen-lora --max_train_steps=1000

The discriminator (the teacher's UNet encoder with a LoRA adapter of its own, plus one head per feature level; with
--discriminator_backbone frozen only the heads train) has its own optimizer, "discriminator", at --learning_rate as
in the reference (--learning_rates discriminator=<lr> to change it). Every flag:
python train_scripts/ufogen.py --help
"""

import sys

from distill.cli import main

if __name__ == "__main__":
    sys.exit(main("ufogen"))
