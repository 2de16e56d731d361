"""`i2l doctor`: every configured checkpoint (backbone, encoder, scorers) checked from its config files and
safetensors headers only, before a long job starts; `require_healthy` is the same check as a gate that `train`
(and produce, the flows) call first. `load=True` adds one tiny forward per component."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field

from i2l.config import Config

# which components each job needs, and whether a step-distilled backbone is a problem for it (it cannot be
# trained on, and the paper's asymmetric guidance needs CFG, which its pipeline does not run)
PURPOSES = {"doctor": ("backbone", "encoder", "scorers"), "train": ("backbone", "encoder"),
            "produce": ("backbone", "encoder"), "evaluate": ("backbone", "encoder", "scorers")}
DISTILLED_IS_A_PROBLEM = ("doctor", "train", "evaluate")


@dataclass
class Component:
    """One checked component: `problems` are (what is wrong, naming the file; what to do)."""

    name: str  # backbone | encoder | scorer.<name>
    path: str
    kind: str = ""
    unset: bool = False  # an optional component that is not configured (scorers)
    loadable: bool = True  # no problem so far stops `--load` from trying it (a distilled backbone still loads)
    facts: list[str] = field(default_factory=list)
    problems: list[tuple[str, str]] = field(default_factory=list)

    def problem(self, what: str, fix: str = "", fatal: bool = True) -> None:
        self.problems.append((what, fix))
        self.loadable = self.loadable and not fatal

    def extend(self, problems: list[tuple[str, str]]) -> None:
        for what, fix in problems:
            self.problem(what, fix)

    @property
    def status(self) -> str:
        return "problem" if self.problems else "unset" if self.unset else "ok"

    @property
    def detail(self) -> str:
        wrong = [f"{what} (fix: {fix})" if fix else what for what, fix in self.problems]
        return "; ".join(wrong + self.facts)

    def to_dict(self) -> dict:
        return {"name": self.name, "path": self.path, "status": self.status, "kind": self.kind,
                "detail": self.detail}


@dataclass
class Report:
    components: list[Component]

    @property
    def ok(self) -> bool:
        return not any(c.problems for c in self.components)

    def to_json(self) -> str:
        return json.dumps({"ok": self.ok, "components": [c.to_dict() for c in self.components]}, indent=2)

    def table(self) -> str:
        """The human report: one row per component, then a fix line under each problem."""
        rows = [(c.name, c.status, c.kind, c.path or "(unset)") for c in self.components]
        widths = [max(len(r[i]) for r in [("component", "status", "kind", "path"), *rows]) for i in range(4)]
        line = lambda r: "  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip()
        out = [line(("component", "status", "kind", "path"))]
        for c, r in zip(self.components, rows):
            out.append(line(r))
            out += [f"    {fact}" for fact in c.facts]
            for what, fix in c.problems:
                out.append(f"    PROBLEM: {what}")
                if fix:
                    out.append(f"    fix: {fix}")
        n = sum(len(c.problems) for c in self.components)
        out.append("ok: every configured component can be used" if self.ok else
                   f"{n} problem(s): fix them before a long job")
        return "\n".join(out)


class UnhealthyCheckpoint(ValueError):
    """A configured checkpoint that a job cannot use (raised before any Ray or GPU work)."""


def diagnose(cfg: Config, load: bool = False, purpose: str = "doctor") -> Report:
    """Check the components `purpose` needs (PURPOSES) from configs and headers; `load` also runs one tiny forward
    of each component that passed. `cfg` is not changed (loaders adjust a copy)."""
    from i2l.doctor.backbone import check_backbone
    from i2l.doctor.encoder import check_encoder

    if purpose not in PURPOSES:
        raise ValueError(f"unknown purpose {purpose!r}: one of {', '.join(PURPOSES)}")
    cfg = copy.deepcopy(cfg)
    wanted = PURPOSES[purpose]
    comps = [check_backbone(cfg, purpose in DISTILLED_IS_A_PROBLEM), check_encoder(cfg)]
    if "scorers" in wanted:
        from i2l.doctor.scorers import check_scorers

        comps += check_scorers(cfg)
    if load:
        from i2l.doctor.forward import run_forwards

        run_forwards(cfg, [c for c in comps if c.loadable and not c.unset])
    return Report(comps)


def require_healthy(cfg: Config, purpose: str) -> Report:
    """Refuse (UnhealthyCheckpoint, one message naming every problem and its fix) a config whose checkpoints
    `purpose` cannot use; called by `train`, `produce` and the flows before any Ray or GPU work starts."""
    report = diagnose(cfg, purpose=purpose)
    if not report.ok:
        wrong = [f"{c.name}: {what}" + (f" (fix: {fix})" if fix else "")
                 for c in report.components for what, fix in c.problems]
        raise UnhealthyCheckpoint(f"cannot {purpose} with preset {cfg.name}: " + "; ".join(wrong) +
                                  f" — `i2l doctor --preset {cfg.name}` shows the full report")
    return report
