"""An exponential moving average of the student's weights, evaluated each epoch and saved as the student."""

from pathlib import Path

import torch
from transformers import TrainerCallback


def ema_decay_at(decay: float, updates: int) -> float:
    """The EMA's decay after `updates` averaged steps: min(decay, (1 + t) / (10 + t)), timm's and TensorFlow's
    warm-up (ModelEmaV3's `use_warmup`, tf.train.ExponentialMovingAverage's num_updates).

    Without it the average starts from the random initial weights and forgets them only at decay**t: at 0.99 they
    still weigh 27% after the 132 steps of 4 beans epochs, and a student so averaged predicted one class (validation
    0.331 at every epoch while the training weights reached 0.774; BENCHMARKS.md, "The EMA")."""
    return min(decay, (1 + updates) / (10 + updates))


def warmed_up_ema(decay: float):
    """AveragedModel's multi_avg_fn for an EMA whose decay warms up (ema_decay_at); integer buffers (BatchNorm's
    num_batches_tracked) follow the model's."""

    @torch.no_grad()
    def update(averaged: list, current: list, updates) -> None:
        weight = 1 - ema_decay_at(decay, int(updates))
        floating = [(a, c) for a, c in zip(averaged, current, strict=True) if torch.is_floating_point(a)]
        if floating:
            torch._foreach_lerp_([a for a, _ in floating], [c for _, c in floating], weight)
        for a, c in zip(averaged, current, strict=True):
            if not torch.is_floating_point(a):
                a.copy_(c)

    return update


class StudentEMA(TrainerCallback):
    """An exponential moving average of the student's weights, BatchNorm statistics included (PyTorch's
    AveragedModel; the decay warms up as timm's does, ema_decay_at), updated after every optimiser step.

    At each epoch's end the averaged weights are swapped into the model, so that the Trainer evaluates, checkpoints
    and (with load_best_model_at_end) keeps the EMA; the training weights come back when the next epoch starts.
    A checkpoint also holds the training weights and the average (kdcache_ema.pt), so --resume continues both.
    """

    FILE = "kdcache_ema.pt"

    def __init__(self, decay: float):
        self.decay, self.ema, self.training_weights = decay, None, None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        from torch.optim.swa_utils import AveragedModel

        self.ema = AveragedModel(model, multi_avg_fn=warmed_up_ema(self.decay), use_buffers=True)
        saved = Path(args.output_dir) / f"checkpoint-{state.global_step}" / self.FILE
        if state.global_step and saved.exists():  # resuming: the checkpoint's weights are the EMA's
            kept = torch.load(saved, map_location="cpu", weights_only=True)
            model.load_state_dict(kept["training"])
            self.ema.load_state_dict(kept["ema"])

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.ema.update_parameters(model)

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        self.swap_in(model)

    def on_epoch_begin(self, args, state, control, model=None, **kwargs):
        if self.training_weights is not None:
            model.load_state_dict(self.training_weights)
            self.training_weights = None

    def on_save(self, args, state, control, model=None, **kwargs):
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if args.should_save and folder.exists():
            torch.save(
                {"training": self.training_weights or model.state_dict(), "ema": self.ema.state_dict()},
                folder / self.FILE,
            )

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if not args.load_best_model_at_end:  # otherwise the best checkpoint, already an EMA, was loaded
            self.swap_in(model)

    def swap_in(self, model):
        if self.training_weights is None:
            self.training_weights = {name: value.detach().clone() for name, value in model.state_dict().items()}
            model.load_state_dict(self.ema.module.state_dict())
