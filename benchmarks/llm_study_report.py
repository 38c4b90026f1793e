"""The report of llm_study.py from whatever runs have finished: report.md, study.json, curves.png; time estimates.

Everything here reads results (the runs' result.json contents) and works on a partial study.
"""
from __future__ import annotations

import json
import os
import statistics
import time

from llm_study_plan import ABLATIONS, BY_LABEL, MAX_EXTENSIONS, METHODS, Run, plan

# Measured on the study's 2-core machine on 2026-12-04, 30 steps of the real job per run
# (launch/train.py --max-steps 30, micro-batch 4 x 64): seconds per optimizer step with 2 threads,
# per "mode" or "hift/<units per group>" (fpft 1.63, hift/8 0.71 and hift/1 0.36 measured; badam
# and hift/1 over a whole epoch from issue 28's 1-epoch wall times, hift/4 interpolated); seconds
# to start a run (imports, model load, first evaluation, save) and per evaluation of the
# validation + test sets (72 records). Finished runs replace them as the study goes on.
DEFAULT_RATES = {"step": {"fpft": 1.63, "hift/8": 0.71, "hift/4": 0.66, "hift/1": 0.45, "badam": 0.59},
                 "startup": 15.0, "eval": 3.5,
                 # A run's time with 1 thread beside another 1-thread run, over its time alone with 2
                 # threads: fpft 2.31 / 1.63 s per step, HiFT 1.03 / 0.71 (so --jobs 2 trains 2 / 1.44
                 # = 1.39x faster). Keyed by runs at a time.
                 "parallel_slowdown": {"1": 1.0, "2": 1.44}}


def write_json(path: str, payload) -> None:
    """Write JSON atomically (a reader, or a crash, never sees half a file)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1)
    os.replace(tmp, path)


def _atomic_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


# ---- time estimates ---------------------------------------------------------------------------
def rate_key(run, study) -> str:
    """The step-time class of a run: its mode, and for HiFT its units per group."""
    mode = BY_LABEL[run.method].mode
    return f"hift/{run.group_size or study.group_size}" if mode == "hift" else mode


def rates(results: dict, study) -> dict:
    """DEFAULT_RATES with what the finished runs measured in their place (as if alone with 2 threads)."""
    out = json.loads(json.dumps(DEFAULT_RATES))
    by_key, startup, evals = {}, [], []
    for r in results.values():
        m = r["metrics"]
        if not m.get("steps"):
            continue
        # a run that shared the cores took parallel_slowdown times longer than alone
        share = out["parallel_slowdown"].get(str(max(1, (os.cpu_count() or 2) // r.get("threads", 2))), 1.0)
        by_key.setdefault(rate_key(Run(**r["run"]), study), []).append(m["train_seconds"] / m["steps"] / share)
        points = max(1, len(r["curve"]) or 2)  # before and after, at least
        evals.append(m["eval_seconds"] / max(1, points - 1) / share)
        startup.append(max(0.0, r["seconds"] - m["train_seconds"] - m["eval_seconds"]) / share)
    out["step"].update({k: statistics.fmean(v) for k, v in by_key.items()})
    if startup:
        out["startup"] = statistics.fmean(startup)
        out["eval"] = statistics.fmean(evals)
    return out


def run_seconds(run, study, rates_: dict) -> float:
    """Estimated wall seconds of one run."""
    steps = run.epochs * steps_per_epoch(study)
    evals = int(run.epochs / run.eval_every) if run.eval_every else 1  # after the start (the first is in startup)
    step = rates_["step"].get(rate_key(run, study), max(rates_["step"].values()))
    return rates_["startup"] + steps * step + evals * rates_["eval"]


def steps_per_epoch(study) -> int:
    """Optimizer steps per epoch of the study's training split (the prompts all fit: none is dropped)."""
    if study.train_size:
        return study.train_size // study.batch_size
    return 1157 // study.batch_size  # the embedded data's 1,229 records less 48 test and 24 validation


def duration(seconds: float) -> str:
    """Seconds in words: "2 h 05 min", "7 min"."""
    minutes = round(seconds / 60)
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{minutes} min"


def plan_summary(study, runs: list, results: dict, seconds: float, jobs: int, lock: str | None) -> str:
    """What the study will run, with its estimated time, as printed at the start."""
    rates_ = rates(results, study)
    lines = [f"LLM study: methods {', '.join(study.methods)}; seeds {', '.join(map(str, study.seeds))}; "
             f"micro-batch {study.batch_size} x {study.max_length} tokens; HiFT groups of {study.group_size} units",
             f"{len(results)} runs finished; {len(runs) - sum(r.key in results for r in runs)} to run (grids as now, "
             "undecided grids counted as choosing their middle LR; each grid may grow by up to 2 runs)"]
    for phase in ("grid", "curve", "ablation"):
        mine = [r for r in runs if r.phase == phase]
        todo = [r for r in mine if r.key not in results]
        lines.append(f"  {phase:<9}{len(mine):>3} runs, {len(todo):>3} to run, about "
                     f"{duration(sum(run_seconds(r, study, rates_) for r in todo))} one at a time with 2 threads")
    per_step = ", ".join(f"{k} {v:.2f}" for k, v in sorted(rates_["step"].items()))
    lines.append(f"seconds per step (2 threads): {per_step}; per run start {rates_['startup']:.0f}, per "
                 f"evaluation {rates_['eval']:.1f}")
    grids = [r for r in runs if r.phase == "grid" and r.key not in results]
    per_method = {r.method: run_seconds(r, study, rates_) for r in grids}
    extra = MAX_EXTENSIONS * sum(per_method.values()) * rates_["parallel_slowdown"].get(str(jobs), 1.0) / jobs
    lines.append(f"estimated time left: {duration(seconds)} with --jobs {jobs} (up to {duration(extra)} more if "
                 "every grid still to run grows twice), " +
                 (f"plus the heavy jobs that take {lock} between runs" if lock else "no lock"))
    return "\n".join(lines)


# ---- aggregation ------------------------------------------------------------------------------
def _ms(values: list[float]) -> tuple[float, float, int]:
    return (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0, len(values))


def _fmt(ms: tuple | None, digits: int = 2) -> str:
    if ms is None:
        return "-"
    mean, std, n = ms
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if n > 1 else f"{mean:.{digits}f}"


def _by_phase(results: dict, phase: str) -> list[dict]:
    return [r for r in results.values() if r["run"]["phase"] == phase]


def curves(results: dict) -> dict:
    """Per method, per evaluated step of the curve runs: mean/std/n of test and validation perplexity, seconds."""
    out = {}
    for r in _by_phase(results, "curve"):
        points = out.setdefault(r["run"]["method"], {})
        for p in r["curve"]:
            points.setdefault(p["step"], []).append(p)
    return {method: [{"step": step, "epoch": ps[0]["epoch"], "seeds": len(ps),
                      "test": _ms([p["test"]["perplexity"] for p in ps]),
                      "val": _ms([p["eval"]["perplexity"] for p in ps]),
                      "train_seconds": statistics.fmean(p["train_seconds"] for p in ps),
                      "wall_seconds": statistics.fmean(p["wall_seconds"] for p in ps)}
                     for step, ps in sorted(points.items())] for method, points in out.items()}


def _at_epoch(points: list[dict], epoch: float) -> dict | None:
    return next((p for p in points if abs(p["epoch"] - epoch) < 1e-6), None)


def summarize(study, results: dict) -> dict:
    """Everything the report shows, as plain data (study.json)."""
    runs, grids = plan(study, results)
    first = study.seeds[0]
    fpft_1 = None
    if grids.get("fpft", {}).get("chosen") is not None:
        key = Run("grid", "fpft", grids["fpft"]["chosen"], first, study.grid_epochs).key
        fpft_1 = results[key]["metrics"]["test_after"]["perplexity"]
    curve = curves(results)
    rows, parity = [], {}
    fpft_curve_1 = _at_epoch(curve.get("fpft", []), 1.0)
    for label in study.methods:
        pts = curve.get(label, [])
        one, two = _at_epoch(pts, 1.0), _at_epoch(pts, study.curve_epochs)
        row = {"method": label, "lr": grids[label]["chosen"], "seeds": max((p["seeds"] for p in pts), default=0),
               "test_1": one and one["test"], "test_2": two and two["test"], "val_1": one and one["val"],
               "val_2": two and two["val"], "train_seconds_2": two and two["train_seconds"]}
        for name, ref in (("fpft_run_1", fpft_1), ("fpft_curve_1", fpft_curve_1 and fpft_curve_1["test"][0])):
            hit = next((p for p in pts if p["epoch"] > 0 and ref is not None and p["test"][0] <= ref), None)
            parity.setdefault(label, {})[name] = {"reference": ref, "epoch": hit and hit["epoch"],
                                                  "train_seconds": hit and hit["train_seconds"]}
        rows.append(row)
    base = None
    if grids.get("hift random", {}).get("chosen") is not None:
        base = results[Run("grid", "hift random", grids["hift random"]["chosen"], first, study.grid_epochs).key]
    ablations = [{"variant": "k4 (baseline)", "lr": base["run"]["lr"], "result": base} if base else None]
    ablations += [{"variant": r["run"]["variant"], "lr": r["run"]["lr"], "result": r}
                  for r in _by_phase(results, "ablation")]
    return {"date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "settings": study.settings(), "grids": grids,
            "fpft_1_epoch_test": fpft_1, "curves": curve, "rows": rows, "parity": parity,
            "ablations": [a for a in ablations if a], "runs_finished": len(results),
            "runs_planned": len(runs), "pending": [r.key for r in runs if r.key not in results]}


# ---- writing ----------------------------------------------------------------------------------
def _pct(x: float | None, ref: float | None) -> str:
    return "-" if x is None or not ref else f"{100 * (x / ref - 1):+.1f}%"


def markdown(study, s: dict, results: dict) -> str:
    """The tables of the report."""
    first = study.seeds[0]
    out = [f"# LLM study report ({s['date']})", "",
           f"{s['runs_finished']} of {s['runs_planned']} runs planned so far have finished"
           + (f"; pending: {', '.join(s['pending'][:6])}{' ...' if len(s['pending']) > 6 else ''}" if s["pending"]
              else "."), "",
           f"## LR grid ({study.grid_epochs:g} epoch, seed {first}; validation perplexity chooses)", "",
           "| method | peak LR | val ppl | test ppl | train s | note |", "|---|---|---|---|---|---|"]
    for label, g in s["grids"].items():
        for lr in g["lrs"]:
            r = results.get(Run("grid", label, lr, first, study.grid_epochs).key)
            if r is None:
                out.append(f"| {label} | {lr:g} | ... | | | |")
                continue
            m, note = r["metrics"], []
            if m.get("badam_switch_every"):
                blocks = r["groups_trained"]
                note.append(f"K={m['badam_switch_every']}, {r['switches']} switch{'es' * (r['switches'] != 1)}, "
                            f"{blocks} block{'s' * (blocks != 1)} trained")
            if r.get("diverged"):
                note.append("diverged")
            bold = "**" if lr == g["chosen"] else ""
            out.append(f"| {label} | {bold}{lr:g}{bold} | {bold}{m['after']['perplexity']:.3f}{bold} | "
                       f"{m['test_after']['perplexity']:.3f} | {m['train_seconds']:.0f} | {'; '.join(note)} |")
        out.append(f"| | | | | | grid {g['state']}{'' if g['state'] != 'capped' else ' (best at an edge: not bracketed)'} |")
    ref = s["fpft_1_epoch_test"]
    out += ["", f"## Curves ({study.curve_epochs:g} epochs at the chosen LR; test / validation perplexity, mean ± std "
            "over seeds; the target: within 2% of fpft at 2 epochs)", "",
            "| method | LR | seeds | test @1 | test @2 | val @1 | val @2 | test @1 vs fpft @1 | test @2 vs fpft @2 | "
            "target | train s (2 epochs) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    fpft_row = next((row for row in s["rows"] if row["method"] == "fpft"), None)
    for row in s["rows"]:
        if not row["seeds"]:
            continue
        ref1, ref2 = ((fpft_row[k] and fpft_row[k][0]) if fpft_row else None for k in ("test_1", "test_2"))
        mine1, mine2 = (row[k] and row[k][0] for k in ("test_1", "test_2"))
        target = "" if row is fpft_row or not (mine2 and ref2) else ("PASS" if mine2 <= 1.02 * ref2 else "FAIL")
        out.append(f"| {row['method']} | {row['lr']:g} | {row['seeds']} | {_fmt(row['test_1'])} | "
                   f"{_fmt(row['test_2'])} | {_fmt(row['val_1'])} | {_fmt(row['val_2'])} | {_pct(mine1, ref1)} | "
                   f"{_pct(mine2, ref2)} | {target} | {row['train_seconds_2'] or 0:.0f} |")
    shown = [label for label in study.methods if label in s["curves"]]
    out += ["", "Test perplexity per evaluation (mean over seeds):", "",
            "| epoch | " + " | ".join(shown) + " |", "|---" * (len(shown) + 1) + "|"]
    epochs = sorted({round(p["epoch"], 4) for pts in s["curves"].values() for p in pts})
    for e in epochs:
        cells = [next((f"{p['test'][0]:.3f}" for p in s["curves"][label] if round(p["epoch"], 4) == e), "-")
                 for label in shown]
        out.append(f"| {e:.3g} | " + " | ".join(cells) + " |")
    out += ["", f"## Epochs to parity: the first evaluation where a method's mean test perplexity reaches full "
            f"fine-tuning's after 1 epoch (its grid run at the chosen LR, seed {first}: "
            f"{'-' if ref is None else f'{ref:.3f}'}; or the fpft curves' mean at epoch 1)", "",
            "| method | reaches the fpft 1-epoch run at epoch | train s | reaches the fpft curve @1 at epoch | train s |",
            "|---|---|---|---|---|"]
    for label, p in s["parity"].items():
        a, b = p["fpft_run_1"], p["fpft_curve_1"]
        cell = lambda x: ("-", "-") if x["reference"] is None else (  # noqa: E731
            ("not within the curve", "-") if x["epoch"] is None else (f"{x['epoch']:.3g}", f"{x['train_seconds']:.0f}"))
        out.append(f"| {label} | {' | '.join(cell(a))} | {' | '.join(cell(b))} |")
    what = {v.name: v.what for v in ABLATIONS}
    out += ["", f"## Ablations (HiFT random at its chosen LR unless noted, 1 epoch, seed {first})", "",
            "| variant | what | LR | test ppl | val ppl | test vs baseline | test vs fpft 1 epoch | train s |",
            "|---|---|---|---|---|---|---|---|"]
    base = s["ablations"][0]["result"]["metrics"]["test_after"]["perplexity"] if s["ablations"] and \
        s["ablations"][0]["variant"].endswith("(baseline)") else None
    for a in s["ablations"]:
        m = a["result"]["metrics"]
        t = m["test_after"]["perplexity"]
        out.append(f"| {a['variant']} | {what.get(a['variant'], f'4 groups of {study.group_size} units')} | "
                   f"{a['lr']:g} | {t:.3f} | {m['after']['perplexity']:.3f} | {_pct(t, base)} | {_pct(t, ref)} | "
                   f"{m['train_seconds']:.0f} |")
    return "\n".join(out) + "\n"


def plot(study, s: dict, results: dict, path: str) -> None:
    """curves.png: the LR grids, and test perplexity vs epochs and vs training seconds (mean ± std over seeds)."""
    import matplotlib
    import matplotlib.ticker
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 5))
    color = {m.label: f"C{i}" for i, m in enumerate(METHODS)}  # one colour per method in every panel
    for label, g in s["grids"].items():
        pts = [(lr, results[k]["metrics"]["after"]["perplexity"]) for lr in g["lrs"]
               if (k := Run("grid", label, lr, study.seeds[0], study.grid_epochs).key) in results
               and not results[k].get("diverged")]
        if pts:
            axes[0].plot(*zip(*pts), marker="o", label=label, color=color[label])
    axes[0].set(xscale="log", xlabel="peak LR", ylabel="validation perplexity",
                title=f"LR grid ({study.grid_epochs:g} epoch, seed {study.seeds[0]})")
    for label in (label for label in study.methods if label in s["curves"]):
        pts = s["curves"][label]
        for ax, x in ((axes[1], [p["epoch"] for p in pts]), (axes[2], [p["train_seconds"] for p in pts])):
            mean = [p["test"][0] for p in pts]
            std = [p["test"][1] for p in pts]
            ax.plot(x, mean, marker=".", label=f"{label} ({pts[-1]['seeds']} seeds)", color=color[label])
            ax.fill_between(x, [m - d for m, d in zip(mean, std)], [m + d for m, d in zip(mean, std)],
                            color=color[label], alpha=0.15)
    ref = s["fpft_1_epoch_test"]
    for ax in axes[1:]:
        if ref is not None:
            ax.axhline(ref, color="gray", linestyle=":", label="fpft, 1-epoch run")
        ax.set(ylabel="test perplexity", yscale="log")
        for axis in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
            axis(matplotlib.ticker.FormatStrFormatter("%g"))  # 8, 9, 10, 20 rather than 10^1 alone
    axes[1].set(xlabel="epochs", title="test perplexity vs epochs")
    axes[2].set(xlabel="training seconds (evaluation excluded)", title="test perplexity vs training time")
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = f"{path}.tmp{os.getpid()}.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def write_report(out: str, study, results: dict) -> str:
    """report.md, study.json (summary + every result) and curves.png under ``out``; the markdown."""
    s = summarize(study, results)
    text = markdown(study, s, results)
    os.makedirs(out, exist_ok=True)
    _atomic_text(os.path.join(out, "report.md"), text)
    write_json(os.path.join(out, "study.json"), {**s, "results": results})
    plot(study, s, results, os.path.join(out, "curves.png"))
    return text
