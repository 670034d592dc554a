"""stablejax.training: QM pre-training, checkpoints and metrics logging.

The StABlE loop (`stablejax.training.stable`) builds on these pieces.
"""

from stablejax.training.checkpoint import CheckpointManager
from stablejax.training.metrics import (
    MetricsWriter,
    format_metrics,
    plot_training_curves,
    progress_bar,
    read_metrics,
)
from stablejax.training.qm import (
    QMFrames,
    QMState,
    default_config,
    evaluate,
    load_pretrained_params,
    load_qm_state,
    make_evaluator,
    make_qm_gradient,
    make_qm_loss,
    predict_energies,
    prepare_frames,
    refit_energy_shift,
    train_qm,
)

__all__ = [
    "CheckpointManager",
    "MetricsWriter",
    "QMFrames",
    "QMState",
    "default_config",
    "evaluate",
    "format_metrics",
    "load_pretrained_params",
    "load_qm_state",
    "make_evaluator",
    "make_qm_gradient",
    "make_qm_loss",
    "plot_training_curves",
    "predict_energies",
    "prepare_frames",
    "progress_bar",
    "read_metrics",
    "refit_energy_shift",
    "train_qm",
]
