"""Train the mean-LoRA baseline: one LoRA (same targets and rank as predicted ones) on all training styles.

Optimised directly by flow matching on the training tuples' targets and prompts (no references), with the
predictor's step budget and batch size (eval.baseline_steps overrides the steps) at eval.mean_lora_lr. Writes
OUT/mean_lora.safetensors (diffusers LoRA format) + mean_lora.json. `i2l evaluate` trains it when needed.
"""

from i2l.cli import add_baseline_training_args, train_baseline


def add_arguments(p):
    add_baseline_training_args(p)


def main(args):
    from i2l.baselines.mean_lora import train_mean_lora

    return train_baseline(args, train_mean_lora, "mean-LoRA")
