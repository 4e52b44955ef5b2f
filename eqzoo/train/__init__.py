"""Training, fine-tuning and evaluation (``eqzoo train | finetune | eval``; the command line is
:mod:`eqzoo.cli`).

One run = one config (see :mod:`eqzoo.config`) and one run folder (see
:mod:`eqzoo.train.checkpoint`). The package, in the order a run uses it:

- :mod:`~eqzoo.train.dist`: processes and devices (one process, or DDP under torchrun);
- :mod:`~eqzoo.train.model`: the model, its optimiser and learning-rate schedule (timm's), precision;
- :mod:`~eqzoo.train.run`: set-up, the epochs, the end (test, results, saved model);
- :mod:`~eqzoo.train.loop`: one epoch, one evaluation pass;
- :mod:`~eqzoo.train.checkpoint`: the run folder and its resumable checkpoints;
- :mod:`~eqzoo.train.output`: the finished run's model in timm's Hub layout;
- :mod:`~eqzoo.train.api`: :func:`train`, :func:`finetune`, :func:`evaluate`.
"""
from ..errors import TrainingError
from .api import evaluate, finetune, finetune_config, train
from .checkpoint import RunDir
from .model import build_model, build_optimizer, build_scheduler, lambda_kl
from .output import save_model_dir

__all__ = ["train", "finetune", "evaluate", "finetune_config", "build_model", "lambda_kl", "build_optimizer",
           "build_scheduler", "RunDir", "save_model_dir", "TrainingError"]
