"""i2l: Image-to-LoRA for diffusion transformers, and the pipeline around it."""
