"""The worker of mass production: loads the predictor + encoder once (not the backbone: the checkpoint records the
adapted layers) and turns batches of StyleJobs into LoRA files, returning their catalog rows. A plain class: the
actor pool (i2l.cluster.pool) runs it as a Ray actor; tests and benchmarks run it in-process."""

from __future__ import annotations

import json
from pathlib import Path

from i2l.model.lora_formats import check_format
from i2l.produce.catalog import GRAY_FILE, catalog_row, style_path
from i2l.produce.jobs import StyleJob


class LoRAProducer:
    def __init__(self, checkpoint_dir: str, out_dir: str, device: str, checkpoint_id: str, checkpoint_sha: str,
                 fmt: str = "diffusers"):
        from i2l.backbones.registry import lora_naming
        from i2l.infer.api import I2L

        self.model = I2L.load(checkpoint_dir, device=device, backbone=False)
        self.out, self.checkpoint_id, self.sha = Path(out_dir), checkpoint_id, checkpoint_sha
        # the file format's layer names are the backbone kind's, from the registry: neither the backbone's weights
        # nor its class (diffusers: ~0.9 s of this actor's start-up on a CPU) are loaded here
        self.fmt, self.naming = check_format(fmt), lora_naming(self.model.cfg.backbone.kind)
        self._warm_up()

    def _warm_up(self) -> None:
        """One throw-away LoRA through the whole path (decode, 2-reference prediction, save, hash): the lazy imports
        and first kernels cost seconds, which belong to start-up, not to the first batch."""
        import io
        import tempfile

        from i2l.data.images import gray_image

        buf = io.BytesIO()
        gray_image(self.model.cfg.encoder.image_size).save(buf, format="PNG")
        with tempfile.TemporaryDirectory() as tmp:
            self.make([StyleJob("warm-up", ["a", "b"], [buf.getvalue()] * 2)], Path(tmp))

    def make_gray(self) -> list[dict]:
        return [self._save("gray_lora", None, ["gray"], self.model.gray_lora(), self.out / GRAY_FILE)]

    def make(self, jobs: list[StyleJob], out: Path | None = None) -> list[dict]:
        from i2l.data.images import decode

        out = out or self.out
        refs = [[decode(b, name=r) for r, b in zip(j.ref_ids, j.images)] for j in jobs]  # a refusal names the ref
        loras = self.model.predict_loras(refs)  # one batched forward
        return [self._save(f"i2l_{len(j.ref_ids)}ref", j.style_id, j.ref_ids, lo, style_path(out, j.style_id), out)
                for j, lo in zip(jobs, loras)]

    def _save(self, method: str, style_id: str | None, ref_ids: list[str], lora, path: Path,
              out: Path | None = None) -> dict:
        # the file describes itself: a file written just before a kill is adopted by the next run, not redone
        lora.meta.update({"style_id": style_id or "", "ref_ids": json.dumps(ref_ids), "checkpoint_sha256": self.sha,
                          "checkpoint_id": self.checkpoint_id, "method": method})
        # atomic (temporary name, then rename)
        lora.save(path, format=self.fmt, backbone=self.naming)  # the kind's prefix and layer names
        return catalog_row(out or self.out, path, lora, self.fmt)
