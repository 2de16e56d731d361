"""The timed steps the cost benchmarks share (train-step, amortization --random-init): a preset's backbone, encoder
and predictor at full size with random weights, and the three things they time — an i2L forward, an i2L training
step and a per-style LoRA training step — run exactly as training and production run them (bf16 autocast and
gradient checkpointing of the backbone on a GPU)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class Steps:
    """Models, data and optimisers for timing; every method runs one complete, synchronised unit of work."""

    cfg: object
    bb: object
    enc: object
    pred: object
    device: torch.device
    peaks: dict[str, float] | None = None  # GPU only: each timed case's peak memory (GiB), filled by `interleaved`

    @classmethod
    def build(cls, preset: str, device: str | None = None, overrides: list[str] | None = None) -> Steps:
        from i2l.backbones.random_init import random_backbone, random_encoder
        from i2l.config import get_config
        from i2l.model.predictor import I2LPredictor

        cfg = get_config(preset, overrides)
        dev = torch.device(device or default_device())
        bb = random_backbone(cfg, dev)
        enc = random_encoder(cfg.encoder, dev)
        pred = I2LPredictor(cfg.predictor, bb.lora_targets(), enc.dim, bb.backbone_id).to(dev)
        if dev.type == "cuda":
            bb.transformer.enable_gradient_checkpointing()  # as training runs it
        return cls(cfg, bb, enc, pred, dev, {} if dev.type == "cuda" else None)

    @property
    def checkpointing(self) -> bool:
        return self.bb.transformer.is_gradient_checkpointing

    def set_checkpointing(self, on: bool) -> None:
        if on:
            self.bb.transformer.enable_gradient_checkpointing()
        else:
            self.bb.transformer.disable_gradient_checkpointing()

    def autocast(self):
        from i2l.model.flow_matching import mixed_precision

        return mixed_precision(self.device, self.cfg.backbone.dtype)

    @property
    def amp(self) -> bool:
        return isinstance(self.autocast(), torch.autocast)

    def free(self, opt) -> None:
        """Drop what a step that ran out of memory left behind: its gradients and the allocator's cached blocks."""
        opt.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def fits(self, step, opt) -> bool:
        """Whether one call of `step` runs; one that runs out of memory is cleaned up after, outside the handler
        (its traceback holds the step's activations: freeing inside it frees nothing)."""
        try:
            step()
            return True
        except torch.OutOfMemoryError:
            pass
        self.free(opt)
        return False

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def batch(self, rows: int, refs: int, styles: int, seed: int = 0) -> dict:
        """Random targets (rows, latent) with their prompt conditioning, and `styles` sets of `refs` references."""
        from i2l.backbones.random_init import random_cond

        g = torch.Generator().manual_seed(seed)
        x1 = torch.randn(rows, *self.bb.latent_shape(self.cfg.backbone.image_size), generator=g)
        s = self.cfg.encoder.image_size
        ref = torch.rand(styles, refs, 3, s, s, generator=g) * 2 - 1
        with torch.no_grad():
            cond = random_cond(self.bb, ["one small circle at the top left"] * rows, g)
        return {"x1": x1.to(self.device, self.bb.dtype), "cond": cond, "refs": ref.to(self.device)}

    def lora_params(self) -> tuple[dict, dict]:
        """A per-style LoRA's trainable A/B (fp32, B non-zero so every path carries gradient)."""
        from i2l.model.lora import zero_lora

        init = zero_lora(self.bb.lora_targets(), self.cfg.predictor.rank, self.bb.backbone_id)
        A = {k: v.to(self.device).requires_grad_(True) for k, v in init.A.items()}
        B = {k: (v + 0.01).to(self.device).requires_grad_(True) for k, v in init.B.items()}
        return A, B

    @torch.no_grad()
    def i2l_forward(self, refs: torch.Tensor, to_host: bool = True):
        """One batched i2L forward: reference sets (U, N, 3, S, S) -> U LoRAs in fp32 on the CPU, ready to save
        (as `I2L.predict_loras` runs it, image decoding aside); `to_host=False` leaves them on the device."""
        from i2l.model.predictor import predict_lora

        with self.autocast():
            lora = predict_lora(self.pred, self.enc, refs)
        if to_host:
            return lora.to_host(torch.float32)  # waits for the GPU
        self.sync()
        return lora

    def i2l_step(self, data: dict, opt, group: int) -> float:
        """One training step: `group` targets share one predicted LoRA (train.targets_per_lora)."""
        from i2l.model.predictor import predict_lora

        B = data["x1"].shape[0]
        owner = torch.arange(B) // group  # (B,) which predicted LoRA each target uses (CPU, as in training)
        with self.autocast():
            lora = predict_lora(self.pred, self.enc, data["refs"][: int(owner[-1]) + 1]).per_sample(owner)
        return self._descend(lora, data, opt)

    def lora_step(self, data: dict, A: dict, Bm: dict, opt) -> float:
        """One per-style LoRA step (what `optimize_lora` runs): FM loss through the backbone, backward, Adam."""
        from i2l.model.lora import LoRA

        return self._descend(LoRA(A, Bm, self.bb.backbone_id), data, opt)

    def _descend(self, lora, data: dict, opt) -> float:
        """One optimiser step on the FM loss through the backbone with `lora`; waits for the GPU."""
        from i2l.model.flow_matching import fm_backward

        loss = fm_backward(self.bb, data["x1"], data["cond"], lora, opt)  # autocasts its forward itself
        opt.step()
        self.sync()
        return loss.item()


def peak_rows(st: Steps) -> list[dict]:
    """Each timed case's peak GPU memory (nothing on a CPU)."""
    return [{"case": k, "metric": "peak_gpu_memory", "value": v, "unit": "GiB"} for k, v in (st.peaks or {}).items()]


def setup_rows(st: Steps, rows: int, refs: int) -> list[dict]:
    """What was timed: sizes and precision, as rows of the bench's table."""
    from i2l.backbones.sizes import param_count as n

    figures = [("backbone_params", n(st.bb.transformer), "params"), ("encoder_params", n(st.enc), "params"),
               ("predictor_params", n(st.pred), "params"), ("rows_per_step", rows, "targets"),
               ("refs_per_style", refs, "images"), ("bf16_autocast", int(st.amp), "0/1")]
    return [{"case": "setup", "metric": m, "value": v, "unit": u} for m, v, u in figures]


def setup_tag(preset: str, overrides: list[str] | None) -> str:
    """What a stored case is prefixed with, so that figures of different set-ups never replace one another in
    `v_benchmarks`: the preset, plus a short hash of its --set overrides when there are any (a later --set of the
    same field wins, as get_config applies them; order does not matter otherwise)."""
    from i2l.config import _split  # parsed as get_config parses them

    last = dict(_split(o) for o in overrides or [])
    if not last:
        return preset
    text = "\n".join(f"{k}={v}" for k, v in sorted(last.items()))
    return f"{preset}+{hashlib.sha256(text.encode()).hexdigest()[:8]}"


def tag_rows(rows: list[dict], preset: str, overrides: list[str] | None) -> list[dict]:
    """Rows with cases prefixed by `setup_tag`; every row also names its overrides in full (kept in `extra`)."""
    tag, sets = setup_tag(preset, overrides), " ".join(f"--set {o}" for o in overrides or [])
    return [{**r, "case": f"{tag}/{r['case']}", **({"overrides": sets} if sets else {})} for r in rows]
