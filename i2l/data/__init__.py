"""MegaStyle data: read the published layout, validate, upscale and shard it for training (`i2l prepare`)."""
