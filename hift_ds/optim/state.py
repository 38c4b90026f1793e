"""A HiFTOptimizer's checkpoint: every group's masters and optimizer state, whole and rank-independent.

Format (``"hift"`` version 1): the optimizer's name, every group's parameter names, the schedule
position, per group and parameter the update count, the skipped fp16 steps; the param groups'
hyper-parameters without their parameters; the loss scaler; and either ``"state"`` (per group,
one whole flat tensor per kind, so a run saved on N ranks resumes on M) or ``"inner"`` (the state
dict of a torch optimizer class run as the inner optimizer).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hift_ds.optim.optimizer import HiFTOptimizer

VERSION = 1


def save_state(opt: "HiFTOptimizer") -> dict:
    """``opt``'s checkpoint (see the module doc); the store's copies home are waited for first."""
    groups_hyper = [{k: v for k, v in pg.items() if k != "params"} for pg in opt.param_groups]
    out = {"hift": {"version": VERSION, "optimizer": opt.optimizer_name,
                    "group_names": [opt.group_param_names(g) for g in range(opt.num_groups)],
                    "schedule": opt.schedule.state_dict(),
                    "steps": [[s] * len(opt.group_params(g)) for g, s in enumerate(opt.group_steps)],
                    "skipped_steps": opt.skipped_steps},
           "param_groups": groups_hyper,
           "loss_scaler": opt.scaler.state_dict() if opt.scaler is not None else None}
    if opt.inner is not None:
        out["inner"] = opt.inner.state_dict()
    else:
        opt.store.synchronize()
        out["state"] = opt.sharding.checkpoint_state(opt.store.home)
    return out


def check_state(opt: "HiFTOptimizer", state_dict: dict) -> None:
    """Refuse a checkpoint that another model, grouping or optimizer wrote, before anything is changed."""
    if "hift" not in state_dict:
        raise ValueError("not a HiFTOptimizer state dict (no 'hift' entry); was it saved by another optimizer?")
    meta = state_dict["hift"]
    names = [opt.group_param_names(g) for g in range(opt.num_groups)]
    if meta["group_names"] != names:
        raise ValueError(f"checkpoint grouping differs from this optimizer's: saved {len(meta['group_names'])} "
                         f"groups, this run has {opt.num_groups}, or the parameter names differ; use the "
                         "same model, units, group_size/num_groups as the saved run")
    if meta["optimizer"] != opt.optimizer_name:
        raise ValueError(f"checkpoint was saved with optimizer {meta['optimizer']!r}, this run uses "
                         f"{opt.optimizer_name!r}")
    opt.schedule.check_state_dict(meta["schedule"])


def load_state(opt: "HiFTOptimizer", state_dict: dict) -> None:
    """Everything ``save_state`` saved, into an optimizer whose active group is deactivated (``check_state`` passed)."""
    load_buffers(opt, state_dict)
    meta = state_dict["hift"]
    opt.group_steps = [max(s, default=0) for s in meta["steps"]]  # every parameter of a group shares the count
    opt.skipped_steps = meta["skipped_steps"]
    opt.schedule.load_state_dict(meta["schedule"])
    if opt.scaler is not None and state_dict.get("loss_scaler"):
        opt.scaler.load_state_dict(state_dict["loss_scaler"])


def load_buffers(opt: "HiFTOptimizer", state_dict: dict) -> None:
    """Hyper-parameters, masters and state (or the inner optimizer's state) and the weights from the masters."""
    for pg, saved in zip(opt.param_groups, state_dict["param_groups"]):
        pg.update({k: v for k, v in saved.items() if k != "params"})
    if opt.inner is not None:
        opt.inner.load_state_dict(state_dict["inner"])
        return
    opt.store.invalidate()
    for g, (home, saved) in enumerate(zip(opt.store.home, state_dict["state"])):
        for k, buf in home.items():
            if k not in saved:
                raise ValueError(f"checkpoint lacks optimizer state {k!r} of group {g}; it was saved with "
                                 "other optimizer settings (e.g. amsgrad, momentum or precision)")
            buf.copy_(opt.sharding.shard_of(g, saved[k]))
        opt.sharding.load_weights(g, saved)

