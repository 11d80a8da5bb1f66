"""Distil an SD 1.x/2.x or SDXL teacher into a 1- or K-step generator with DMD2 (improved distribution matching).

    accelerate launch train_scripts/dmd2.py --pretrained_teacher_model=<folder or Hub id> \
        --train_data_dir=<images + captions> --output_dir=dmd2 --max_train_steps=20000

Defaults follow the reference code for the teacher's family: SD 1.x/2.x one step, real guidance 1.75, ten fake-score
updates per generator update, GAN weight 1e-3; SDXL four steps (999/749/499/249) by backward simulation, guidance 8,
ratio 5, GAN weight 5e-3. The GAN term reads real images (--train_data_dir or --dataset_name); with
--gen_cls_loss_weight 0 prompts are enough (--prompts_file). The student is a LoRA (default) or the full UNet
(--full_finetune); the fake score is a second LoRA on the same UNet. Every flag: python train_scripts/dmd2.py --help
"""

import sys

from distill.cli import main

if __name__ == "__main__":
    sys.exit(main("dmd2"))
