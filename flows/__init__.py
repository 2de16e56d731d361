"""Prefect flows over the i2l stages: thin wrappers (retries, idempotent re-runs by the results store, artifacts)
around library calls that use Ray themselves. Entry points as prefect.yaml names them: `flows/<module>.py:<flow>`.

The flow process never imports torch before a stage that runs models in it (evaluation, production): it lives
through the whole pipeline, and while the predictor trains it waits next to the Ray Train worker, so torch and a
stage's leftovers in it would count in the machine's peak (~0.7 GB measured, docs/results.md). The toy models'
pretraining runs in a child process of its own (i2l.cluster.child); a flow module imports a stage's model code
inside the task that runs it. tests/flows/test_torch_free.py holds this."""

from __future__ import annotations

import importlib

# flow name -> "module:function" (modules are not re-exported here: `flows.train` stays the module)
FLOWS = {
    "prepare_data": "flows.prepare_data:prepare_data",
    "pretrain_toy": "flows.pretrain_toy:pretrain_toy",
    "train": "flows.train:train",
    "produce": "flows.produce:produce",
    "evaluate": "flows.evaluate:evaluate",
    "report": "flows.report:report",
    "pipeline": "flows.pipeline:pipeline",
}


def load_flow(name: str):
    """The Prefect flow object called `name` (see FLOWS)."""
    if name not in FLOWS:
        raise ValueError(f"unknown flow {name!r}; flows are {', '.join(FLOWS)}")
    module, attr = FLOWS[name].split(":")
    return getattr(importlib.import_module(module), attr)
