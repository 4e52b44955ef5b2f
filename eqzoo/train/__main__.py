"""``python -m eqzoo.train [train|finetune|eval] ...`` (default ``train``), also under torchrun."""
import sys

from ..cli import main_train

sys.exit(main_train())
