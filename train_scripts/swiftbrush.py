"""Image-free one-step distillation of an SD 1.x/2.x or SDXL teacher by variational score distillation (SwiftBrush).

    accelerate launch train_scripts/swiftbrush.py --pretrained_teacher_model=<folder or Hub id> \
        --prompts_file=<prompts.txt, one per line> --output_dir=swiftbrush --max_train_steps=10000

Prompts only: --prompts_file, or the caption column of --dataset_name / --train_data_dir. The student is a LoRA
(default) or the full UNet (--full_finetune); the fake score's learning rate is --learning_rate times
--fake_score_lr_ratio (or --learning_rates fake_score=<lr>). Every flag: python train_scripts/swiftbrush.py --help
"""

import sys

from distill.cli import main

if __name__ == "__main__":
    sys.exit(main("swiftbrush"))
