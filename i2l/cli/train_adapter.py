"""Train the adapter baseline: the frozen encoder's patch tokens -> extra context tokens for the backbone.

Trained by flow matching through the frozen backbone on the same training tuples, with the same step budget
and batch size as the i2L predictor (train.steps x train.batch_size; eval.baseline_steps overrides the steps).
Writes OUT/adapter.safetensors + adapter.json (config, loss curve). `i2l evaluate` trains it when needed.
"""

from i2l.cli import add_baseline_training_args, train_baseline


def add_arguments(p):
    add_baseline_training_args(p)


def main(args):
    from i2l.baselines.adapter import train_adapter

    return train_baseline(args, train_adapter, "adapter")
