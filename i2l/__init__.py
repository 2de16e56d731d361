"""i2l: Image-to-LoRA for diffusion transformers, and the pipeline around it."""

__all__ = ["I2L", "LoRA"]


def __getattr__(name):
    # Lazy: `import i2l` stays cheap (no torch/diffusers) for the CLI and the flows.
    if name == "I2L":
        from i2l.infer.api import I2L

        return I2L
    if name == "LoRA":
        from i2l.model.lora import LoRA

        return LoRA
    raise AttributeError(name)
