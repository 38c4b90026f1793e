"""The study's design for llm_study.py: methods and their LR grids, ablations, settings, and the plan.

``plan`` is a pure function of the finished runs: which runs the study needs now, in the order
to run them. Grids grow outward until their best LR is bracketed; curves and ablations of a
method appear once its grid has chosen. Add an ablation by adding a Variant to ABLATIONS.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GRID_RATIO, MAX_EXTENSIONS = 2.0, 2  # a grid grows by x2 steps, at most twice per method


@dataclass(frozen=True)
class Method:
    """One fine-tuning method of the comparison and its initial LR grid."""

    label: str
    mode: str
    strategy: str | None
    grid: tuple[float, ...]


# Priors (test perplexity, 1 epoch, seed 7, issue 28): fpft 1e-4 -> 8.23; HiFT random 1e-4 / 3e-4 /
# 6e-4 -> 9.97 / 9.59 / 10.87; BAdam 3e-4 -> 11.98 and, at 24 steps, 3e-4 beat 1e-4.
METHODS = (
    Method("fpft", "fpft", None, (5e-5, 1e-4, 2e-4)),
    Method("hift bottom2up", "hift", "bottom2up", (1.5e-4, 3e-4, 6e-4)),
    Method("hift top2down", "hift", "top2down", (1.5e-4, 3e-4, 6e-4)),
    Method("hift random", "hift", "random", (1.5e-4, 3e-4, 6e-4)),
    Method("badam", "badam", None, (1.5e-4, 3e-4, 6e-4)),
)
BY_LABEL = {m.label: m for m in METHODS}


@dataclass(frozen=True)
class Variant:
    """An ablation: one method (at its chosen LR, first seed) with one thing changed."""

    name: str
    what: str
    method: str = "hift random"
    group_size: int | None = None  # units per HiFT group (None: the study's)
    schedule: str = "decay"  # "decay": the config's; "steps": official HiFT's horizon; "constant": after warm-up
    weight_decay: float | None = None  # None: the config's
    epochs: float = 1.0
    strategy: str | None = None  # None: the method's


ABLATIONS = (
    Variant("k8", "8 groups of 4 units (k = 8)", group_size=4),
    Variant("k32", "32 groups of 1 unit (k = 32)", group_size=1),
    Variant("steps-horizon", "the official HiFT code's LR schedule: built over the run's optimizer steps but stepped "
            "once per cycle, so it covers 1/k of its decay and warms up k times longer", schedule="steps"),
    Variant("constant", "constant LR after the warm-up (no decay)", schedule="constant"),
    Variant("wd0", "weight decay 0 (the official HiFT scripts' setting)", weight_decay=0.0),
    Variant("shuffled", "the official HiFT code's random order: units shuffled once for the run, groups of "
            "non-adjacent units in one fixed order", strategy="shuffled"),
)


@dataclass(frozen=True)
class Run:
    """One launch/train.py run of the study."""

    phase: str  # "grid", "curve" or "ablation"
    method: str
    lr: float
    seed: int
    epochs: float
    eval_every: float = 0.0
    variant: str = ""
    group_size: int | None = None
    schedule: str = "decay"
    weight_decay: float | None = None
    strategy: str | None = None  # an ablation's order (None: the method's)

    @property
    def key(self) -> str:
        """Its directory under the study's, e.g. grid/hift_random/lr0.0003_seed7."""
        return f"{self.phase}/{self.method.replace(' ', '_')}/{self.variant + '_' if self.variant else ''}" \
               f"lr{self.lr:g}_seed{self.seed}"


@dataclass
class Study:
    """The study's settings (saved in settings.json; a resume must match them)."""

    seeds: tuple[int, ...] = (7, 8)
    methods: tuple[str, ...] = tuple(m.label for m in METHODS)
    ablations: tuple[str, ...] = tuple(v.name for v in ABLATIONS)
    test_size: int = 48
    val_size: int = 24
    train_size: int = 0  # 0: every remaining record
    split_seed: int = 0  # quality_llm.write_split's: the same split as issue 28's runs
    batch_size: int = 4
    max_length: int = 64
    group_size: int = 8
    grid_epochs: float = 1.0
    curve_epochs: float = 2.0
    curve_every: float = 0.25
    deepspeed: str = os.path.join(ROOT, "ds_configs", "hift.json")
    train_args: tuple[str, ...] = ()  # passed to every launch/train.py run as they are

    @classmethod
    def from_settings(cls, saved: dict) -> "Study":
        """The Study a settings.json describes."""
        fields = {f.name for f in dataclasses.fields(cls)}
        kw = {k: tuple(v) if isinstance(v, list) else v for k, v in saved.items() if k in fields}
        if not os.path.isabs(kw.get("deepspeed", "/")):
            kw["deepspeed"] = os.path.join(ROOT, kw["deepspeed"])
        return cls(**kw)

    def settings(self) -> dict:
        """The settings as JSON, paths relative to the checkout where they lie in it."""
        out = dataclasses.asdict(self)
        out["deepspeed"] = os.path.relpath(self.deepspeed, ROOT) if self.deepspeed.startswith(ROOT) else self.deepspeed
        return json.loads(json.dumps(out))  # tuples as lists, as they read back


# ---- planning: a pure function of the finished runs -------------------------------------------
def score(result: dict | None) -> float:
    """Validation perplexity after training (what picks an LR); inf for a diverged run, NaN if not finished."""
    if result is None:
        return math.nan
    if result.get("diverged"):
        return math.inf
    return result["metrics"]["after"]["perplexity"]


def grid_state(method: Method, seed: int, epochs: float, results: dict) -> tuple[list[Run], str, float | None]:
    """(its grid runs, "running" / "bracketed" / "capped", the chosen LR once decided) from the finished runs."""
    lrs = sorted(method.grid)
    for extensions in range(MAX_EXTENSIONS + 1):
        runs = [Run("grid", method.label, lr, seed, epochs) for lr in lrs]
        scores = [score(results.get(r.key)) for r in runs]
        if any(math.isnan(s) for s in scores):
            return runs, "running", None
        best = min(range(len(lrs)), key=lambda i: scores[i])  # the lowest LR wins a tie
        if 0 < best < len(lrs) - 1:
            return runs, "bracketed", lrs[best]
        if extensions == MAX_EXTENSIONS or math.isinf(scores[best]):
            return runs, "capped", lrs[best]  # reported as not bracketed
        lrs = [lrs[0] / GRID_RATIO] + lrs if best == 0 else lrs + [lrs[-1] * GRID_RATIO]
    raise AssertionError("unreachable")


def plan(study: Study, results: dict, assume_chosen: bool = False) -> tuple[list[Run], dict]:
    """Every run the study needs so far, in the order to run them, and per method its grid's state.

    Curves and ablations of a method appear once its grid has chosen an LR; with ``assume_chosen``
    an undecided grid is taken to choose its middle LR (for the time estimate of the whole study).
    """
    first = study.seeds[0]
    grids = {label: grid_state(BY_LABEL[label], first, study.grid_epochs, results) for label in study.methods}
    chosen = {label: lr for label, (_, _, lr) in grids.items() if lr is not None}
    if assume_chosen:
        chosen = {label: chosen.get(label, sorted(BY_LABEL[label].grid)[len(BY_LABEL[label].grid) // 2])
                  for label in study.methods}
    width = max((len(runs) for runs, _, _ in grids.values()), default=0)
    # Round-robin over the methods: a busy spell of the machine does not fall on one method only.
    runs = [grids[label][0][i] for i in range(width) for label in study.methods if i < len(grids[label][0])]
    runs += [Run("curve", label, chosen[label], seed, study.curve_epochs, study.curve_every)
             for seed in study.seeds for label in study.methods if label in chosen]
    for v in (v for v in ABLATIONS if v.name in study.ablations):
        if v.method in chosen:
            runs.append(Run("ablation", v.method, chosen[v.method], first, v.epochs, 0.0, v.name, v.group_size,
                            v.schedule, v.weight_decay, v.strategy))
    return runs, {label: {"lrs": [r.lr for r in g[0]], "state": g[1], "chosen": g[2]} for label, g in grids.items()}


def run_config(base: dict, run: Run, total_steps: int, groups: int) -> dict | None:
    """The DeepSpeed config of an ablation that changes it (None: the study's config as it is)."""
    if run.schedule == "decay" and run.weight_decay is None:
        return None
    cfg = copy.deepcopy(base)
    if run.weight_decay is not None:
        cfg["optimizer"]["params"]["weight_decay"] = run.weight_decay
    if run.schedule == "constant":
        cfg["scheduler"] = {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": run.lr,
                                                            "warmup_num_steps": "auto", "warmup_type": "linear"}}
    elif run.schedule == "steps":
        # hift-ds converts step counts to cycles (k steps each); official HiFT steps its scheduler once
        # per cycle over a horizon counted in optimizer steps. Counts k times larger here convert to
        # exactly that horizon (and its warm-up) in cycles.
        params = cfg["scheduler"]["params"]
        params["total_num_steps"] = total_steps * groups
        params["warmup_num_steps"] = max(1, total_steps // 10) * groups  # train.py's "auto" warm-up, x k
    elif run.schedule != "decay":
        raise ValueError(f"unknown schedule {run.schedule!r}")
    return cfg
