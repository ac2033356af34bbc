"""isoFLOP studies: plan the points, and report on a finished (or running) sweep.

    python launch.py experiment=isoflop isoflop.budget=2e13 'isoflop.methods=[dense,peer]'
    python -m orchestrator.isoflop report runs/sweeps/isoflop_<date>_<time>
    python -m orchestrator.isoflop report <sweep dir> <sweep dir> --out <dir>   # sweeps together

Plan. `isoflop.methods` (values of model.ffn) x `isoflop.ladder` (rungs: mappings of model keys)
gives the points, in that order (method-major). Every point trains the same number of training
FLOPs, `isoflop.budget`: with F its training FLOPs per token (model/flops.py: 3 x forward,
attention and product-key retrieval included) and B the tokens of one optimizer step
(micro_batch x grad_accum x dp x seq_len), it trains steps = round(budget / (F B)) steps, so it
spends steps x F x B FLOPs, within half a step of the budget (|spent - budget| <= F B / 2). The
models differ in size and cost per token, so they see different numbers of tokens: equal total
compute is the paper's comparison (He 2024, Fig. 1). Everything else is shared: data (the windows
of step s are a function of trainer.seed and s only), optimizer, learning rate; each point's
warmup is `isoflop.warmup_fraction` of its own steps and its cosine decay runs to its last step
(optim.decay_steps is set to null).

A point is a set of overrides of plain keys (model.ffn=peer, model.d_model=128, ...,
trainer.max_steps, optim.warmup_steps, optim.decay_steps), a function of the composed config:
`generate_points` is the point generator launch.py asks of every composed config: a study becomes
one sweep over its points (each with isoflop.point set, so a point is reproducible alone:
`... isoflop.point=3`), and the whole study is refused if any point is bad.

Report. Each point's config.json and metrics.jsonl give the table: method, rung, parameters,
active parameters per token, tokens, FLOPs spent, final validation loss and perplexity, and for
product-key layers (PEER, PKM) the share of experts used and KL(usage || uniform) at the final
evaluation. Written to <sweep dir>/report/ (isoflop.md, isoflop.json, isoflop.png: validation loss
against parameters, one line per method, the mean over seeds where a sweep has several) and
logged as artifacts of one MLflow run, `<sweep id>_report`, in the points' experiment and store.
launch.py writes it at the end of a local sweep (or a Slurm sweep with cluster.wait=true).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import sys
from typing import Any, Optional

from model.flops import count_model
from orchestrator.config import load_config
from orchestrator.errors import ConfigError


@dataclasses.dataclass
class Point:
    """One run of an isoFLOP plan."""

    index: int
    method: str
    rung: int
    overrides: dict[str, Any]  # dotted key -> value, applied to the composed config
    flops_per_token: int  # training FLOPs per token (3 x forward)
    tokens_per_step: int
    steps: int
    budget: float
    total_params: int
    active_params: int

    @property
    def tokens(self) -> int:
        return self.steps * self.tokens_per_step

    @property
    def flops_spent(self) -> int:
        return self.steps * self.tokens_per_step * self.flops_per_token

    def override_strings(self) -> list[str]:
        """The overrides as `key=value` strings (for labels, tags and Hydra)."""
        return [f"{k}={_override_value(v)}" for k, v in self.overrides.items()]


def _override_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_override_value(v) for v in value) + "]"
    return str(value)


def set_dotted(raw: dict, key: str, value: Any) -> None:
    """raw['a']['b'] = value for key 'a.b' (in place)."""
    *parents, leaf = key.split(".")
    node = raw
    for name in parents:
        node = node[name]
    node[leaf] = value


def apply_overrides(raw: dict, overrides: dict[str, Any]) -> dict:
    """A deep copy of the plain config dict with the point's dotted overrides set."""
    out = copy.deepcopy(raw)
    for key, value in overrides.items():
        set_dotted(out, key, value)
    return out


def plan(raw: dict) -> list[Point]:
    """The points of the study that the composed, resolved config dict `raw` describes.

    Raises ConfigError for a plan that cannot run (a rung that makes an invalid model, a budget
    that buys fewer than isoflop.min_steps steps at some point). Does not depend on
    isoflop.point, so every point of a sweep computes the same plan.
    """
    import torch

    from orchestrator.config import validate

    cuda_device_count = torch.cuda.device_count()
    base = load_config(raw)
    settings = base.isoflop
    if settings is None:
        raise ConfigError("isoflop", None, "no isoFLOP settings in this config", "use experiment=isoflop")
    t = base.trainer
    tokens_per_step = t.micro_batch_size * t.grad_accum_steps * base.parallel.dp * base.data.seq_len
    points: list[Point] = []
    for method in settings.methods:
        for rung_num, rung in enumerate(settings.ladder):
            model_overrides = {"model.ffn": method, **{f"model.{k}": v for k, v in rung.items()}}
            label = f"isoflop.ladder[{rung_num}] with model.ffn={method}"
            try:
                cfg = load_config(apply_overrides(raw, model_overrides))
                validate(cfg, cuda_device_count=cuda_device_count)
            except ConfigError as exc:
                raise ConfigError(exc.key, exc.value, f"{exc.problem} (in {label})", exc.fix) from None
            counts = count_model(cfg.model, cfg.data.seq_len)
            flops_per_step = counts.flops_per_token_train * tokens_per_step
            steps = int(round(settings.budget / flops_per_step))
            if steps < settings.min_steps:
                need = settings.min_steps * flops_per_step
                raise ConfigError("isoflop.budget", settings.budget,
                                  f"buys {steps} optimizer steps of {label} ({counts.flops_per_token_train:,} "
                                  f"training FLOPs/token x {tokens_per_step} tokens/step), fewer than "
                                  f"isoflop.min_steps={settings.min_steps}",
                                  f"raise isoflop.budget to at least {need:.3g}, or drop that rung")
            warmup = int(round(settings.warmup_fraction * steps))
            overrides = {**model_overrides, "trainer.max_steps": steps, "optim.warmup_steps": warmup,
                         "optim.decay_steps": None}
            point = Point(index=len(points), method=method, rung=rung_num, overrides=overrides,
                          flops_per_token=counts.flops_per_token_train, tokens_per_step=tokens_per_step,
                          steps=steps, budget=float(settings.budget), total_params=counts.total_params,
                          active_params=counts.active_params_per_token)
            # Internal invariant: rounding to whole steps misses the budget by at most half a step.
            assert abs(point.flops_spent - point.budget) <= flops_per_step / 2 + 1e-6 * point.budget
            points.append(point)
    return points


def point_config(raw: dict) -> tuple[dict, Optional[Point]]:
    """For a config with isoflop.point set: (the config with that point's overrides, the point).
    Otherwise (raw, None)."""
    settings = raw.get("isoflop")
    if not settings or settings.get("point") is None:
        return raw, None
    points = plan(raw)
    num = settings["point"]
    if not 0 <= num < len(points):
        raise ConfigError("isoflop.point", num, f"the plan has {len(points)} points (0..{len(points) - 1})",
                          f"set isoflop.point in 0..{len(points) - 1}, or drop it to run them all")
    point = points[num]
    return apply_overrides(raw, point.overrides), point


def generate_points(raw: dict, label: str = "") -> Optional[tuple[list[tuple[dict[str, Any], list[str]]], bool]]:
    """Point generator for launch.py: what the composed, resolved config `raw` stands for.

    None for an ordinary run (no isoflop settings). Otherwise ([(values, overrides)], is_sweep):
    per run the dotted keys to set on the config and the same as `key=value` strings (for the
    sweep's labels and tags). A study without isoflop.point is a sweep over its planned points (the
    plan is printed); with isoflop.point it is that one point, an ordinary run."""
    settings = raw.get("isoflop")
    if not settings:
        return None
    if settings.get("point") is not None:
        _, point = point_config(raw)
        return [(dict(point.overrides), point.override_strings())], False
    planned = plan(raw)
    print(f"isoFLOP plan: {len(planned)} points at {settings['budget']:.4g} training FLOPs each"
          + (f" ({label})" if label else "") + "\n" + format_plan(planned), flush=True)
    return [({**p.overrides, "isoflop.point": p.index}, [f"isoflop.point={p.index}", *p.override_strings()])
            for p in planned], True


def format_plan(points: list[Point]) -> str:
    """The plan as a table for the console (launch.py prints it before the sweep starts)."""
    header = ["#", "method", "rung", "params", "active", "FLOPs/token", "steps", "tokens", "FLOPs spent", "vs budget"]
    rows = [[str(p.index), p.method, str(p.rung), _human(p.total_params), _human(p.active_params),
             _human(p.flops_per_token), str(p.steps), _human(p.tokens), f"{p.flops_spent:.4g}",
             f"{(p.flops_spent - p.budget) / p.budget:+.2%}"] for p in points]
    return _text_table(header, rows)


# ----------------------------------------------------------------------------- report

def _human(n: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.3g}"


def _text_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(x) for x in col) for col in zip(header, *rows)]
    lines = ["  ".join(x.ljust(w) for x, w in zip(line, widths)).rstrip() for line in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def collect(sweep_dir: str) -> list[dict[str, Any]]:
    """One row per point of the sweep that has a config.json: what the report shows."""
    from orchestrator.sweep import _metrics, points

    rows = []
    for meta in points(sweep_dir):
        config_path = os.path.join(meta["run_dir"], "config.json")
        if not os.path.isfile(config_path):
            continue
        with open(config_path, encoding="utf-8") as f:
            raw = json.load(f)
        cfg = load_config(raw)
        counts = count_model(cfg.model, cfg.data.seq_len)
        t = cfg.trainer
        tokens_per_step = t.micro_batch_size * t.grad_accum_steps * cfg.parallel.dp * cfg.data.seq_len
        row: dict[str, Any] = {
            "num": meta["num"], "method": cfg.model.ffn, "rung": None, "seed": t.seed,
            "params": counts.total_params, "non_embedding_params": counts.non_embedding_params,
            "active_params": counts.active_params_per_token, "flops_per_token": counts.flops_per_token_train,
            "max_steps": t.max_steps, "step": 0, "tokens": 0, "flops_spent": 0,
            "budget": cfg.isoflop.budget if cfg.isoflop else None, "val_loss": None, "val_perplexity": None,
            "usage": None, "kl_uniform": None, "run_dir": meta["run_dir"], "overrides": meta["overrides"],
        }
        if cfg.isoflop is not None and cfg.isoflop.point is not None:
            ladder = cfg.isoflop.ladder
            n_rungs = len(ladder)
            row["rung"] = cfg.isoflop.point % n_rungs if n_rungs else None
            row["rung_overrides"] = ladder[row["rung"]] if n_rungs else {}
        for record in _metrics(os.path.join(meta["run_dir"], "metrics.jsonl")):
            row["step"] = max(row["step"], record.get("step", 0))
            if "val_loss" in record:
                row["val_loss"] = record["val_loss"]
                row["val_perplexity"] = record.get("val_perplexity")
                # peer_*: the names before MoE layers reported usage too (older runs' metrics)
                row["usage"] = record.get("expert_usage", record.get("peer_usage"))
                row["kl_uniform"] = record.get("expert_kl_uniform", record.get("peer_kl_uniform"))
        row["tokens"] = row["step"] * tokens_per_step
        row["flops_spent"] = row["tokens"] * counts.flops_per_token_train
        row["done"] = row["step"] >= t.max_steps
        rows.append(row)
    return sorted(rows, key=lambda r: r["num"])


def _renumber_rungs(rows: list[dict[str, Any]]) -> None:
    """Sweeps with different ladders in one report: number the distinct rungs 0, 1, ... by model
    size (the fewest parameters among a rung's points), so one rung number means one model size."""
    keyed: dict[str, list[dict]] = {}
    for r in rows:
        if r["rung"] is not None:
            keyed.setdefault(json.dumps(r.get("rung_overrides", {}), sort_keys=True), []).append(r)
    order = sorted(keyed, key=lambda k: min(r["params"] for r in keyed[k]))
    for num, key in enumerate(order):
        for r in keyed[key]:
            r["rung"] = num


def markdown_table(rows: list[dict[str, Any]]) -> str:
    header = ["#", "method", "rung", "seed", "params", "non-emb. params", "active params", "steps", "tokens",
              "FLOPs spent", "val loss", "val ppl", "expert usage", "KL(usage‖uniform)", "status"]

    def fmt(value, spec):
        return "-" if value is None or (isinstance(value, float) and not math.isfinite(value)) else format(value, spec)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        rung = "-" if r["rung"] is None else str(r["rung"])
        lines.append("| " + " | ".join([
            str(r["num"]), r["method"], rung, str(r["seed"]), _human(r["params"]),
            _human(r["non_embedding_params"]), _human(r["active_params"]), str(r["step"]), _human(r["tokens"]),
            f"{r['flops_spent']:.4g}", fmt(r["val_loss"], ".4f"), fmt(r["val_perplexity"], ".3f"),
            "-" if r["usage"] is None else f"{r['usage']:.1%}", fmt(r["kl_uniform"], ".3f"),
            "done" if r["done"] else f"step {r['step']}/{r['max_steps']}",
        ]) + " |")
    rungs = {r["rung"]: r.get("rung_overrides", {}) for r in rows if r["rung"] is not None}
    if rungs:
        lines += ["", "rungs: " + "; ".join(f"{num} = {_rung_label(rung)}" for num, rung in sorted(rungs.items()))]
    return "\n".join(lines)


def _rung_label(rung: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in rung.items()) if rung else "-"


def best_by_method(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per method, the finished point with the lowest validation loss (mean over seeds by rung)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["done"] and r["val_loss"] is not None:
            groups.setdefault((r["method"], r["rung"], r["params"]), []).append(r)
    best: dict[str, dict[str, Any]] = {}
    for (method, rung, params), members in groups.items():
        mean = sum(m["val_loss"] for m in members) / len(members)
        if method not in best or mean < best[method]["val_loss"]:
            best[method] = {"rung": rung, "params": params, "val_loss": mean,
                            "seeds": sorted(m["seed"] for m in members)}
    return best


def plot(rows: list[dict[str, Any]], path: str, title: str) -> None:
    """Validation loss against total parameters, one line per method (mean over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    for method in methods:
        by_params: dict[int, list[float]] = {}
        for r in rows:
            if r["method"] == method and r["val_loss"] is not None and r["done"]:
                by_params.setdefault(r["params"], []).append(r["val_loss"])
        if not by_params:
            continue
        xs = sorted(by_params)
        ys = [sum(by_params[x]) / len(by_params[x]) for x in xs]
        ax.plot(xs, ys, marker="o", label=method)
    ax.set_xscale("log")
    ax.set_xlabel("parameters (total)")
    ax.set_ylabel("final validation loss (nats/token)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(sweep_dirs: str | list[str], out_dir: Optional[str] = None, log_mlflow: bool = True) -> str:
    """Write isoflop.{md,json,png} to `out_dir` (default <first sweep dir>/report), log them to
    MLflow; return the markdown. Several sweep directories (e.g. methods run as separate sweeps at
    one budget) make one table and one plot; their points are then numbered <sweep id>/<num>."""
    dirs = [sweep_dirs] if isinstance(sweep_dirs, str) else list(sweep_dirs)
    rows = []
    for sweep_dir in dirs:
        for row in collect(sweep_dir):
            if len(dirs) > 1:
                row["num"] = f"{os.path.basename(os.path.normpath(sweep_dir))}/{row['num']}"
            rows.append(row)
    if not rows:
        return f"no isoFLOP points with a config.json in {', '.join(dirs)}"
    if len(dirs) > 1:
        _renumber_rungs(rows)
    out_dir = out_dir or os.path.join(dirs[0], "report")
    os.makedirs(out_dir, exist_ok=True)
    sweep_id = "+".join(os.path.basename(os.path.normpath(d)) for d in dirs)
    budgets = sorted({r["budget"] for r in rows if r["budget"] is not None})
    budget_text = ", ".join(f"{b:.3g}" for b in budgets) or "?"
    best = best_by_method(rows)
    lines = [f"isoFLOP sweep {sweep_id}: budget {budget_text} training FLOPs per point, {len(rows)} points",
             "", markdown_table(rows), ""]
    if best:
        lines.append("best point per method (lowest final validation loss; mean over seeds):")
        for method, b in sorted(best.items(), key=lambda kv: kv[1]["val_loss"]):
            lines.append(f"- {method}: {b['val_loss']:.4f} at rung {b['rung']} ({_human(b['params'])} params), "
                         f"seeds {b['seeds']}")
    text = "\n".join(lines)
    md_path = os.path.join(out_dir, "isoflop.md")
    with open(md_path, "w", encoding="utf-8") as f:
        f.write(text + "\n")
    json_path = os.path.join(out_dir, "isoflop.json")
    with open(json_path, "w", encoding="utf-8") as f:
        json.dump({"sweep": sweep_id, "budgets": budgets, "points": rows, "best": best}, f, indent=2, default=str)
    png_path = os.path.join(out_dir, "isoflop.png")
    where = sweep_id if len(dirs) == 1 else f"{len(dirs)} sweeps"
    plot(rows, png_path, f"isoFLOP {where}: {budget_text} training FLOPs per point")
    if log_mlflow:
        _log_report(sweep_id, rows, best, [md_path, json_path, png_path])
    return text + f"\n\nwritten: {md_path}, {png_path}"


def _log_report(sweep_id: str, rows: list[dict], best: dict, paths: list[str]) -> None:
    """One MLflow run `<sweep id>_report` in the points' experiment, with the report files."""
    with open(os.path.join(rows[0]["run_dir"], "config.json"), encoding="utf-8") as f:
        raw = json.load(f)
    tracking = raw["tracking"]
    if not tracking["enabled"]:
        return
    import mlflow

    from orchestrator.tracking import default_tracking_uri

    uri = tracking["uri"] or default_tracking_uri(raw["run"]["root"])
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(tracking["experiment"])
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(tracking["experiment"])
    run = client.create_run(experiment_id, run_name=f"{sweep_id}_report",
                            tags={"sweep.id": sweep_id, "sweep.report": "isoflop"})
    run_id = run.info.run_id
    for method, b in best.items():
        client.log_metric(run_id, f"best_val_loss.{method}", b["val_loss"])
        client.log_param(run_id, f"best_params.{method}", b["params"])
    for path in paths:
        client.log_artifact(run_id, path)
    client.set_terminated(run_id)


def main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m orchestrator.isoflop",
                                     description="Report on isoFLOP sweeps (finished or running).")
    sub = parser.add_subparsers(dest="command", required=True)
    rep = sub.add_parser("report", help="table + plot of the points of one or more sweep directories")
    rep.add_argument("sweep_dirs", nargs="+", help="sweep directories, e.g. runs/sweeps/isoflop_<date>_<time>")
    rep.add_argument("--out", default=None, help="output directory (default: <first sweep dir>/report)")
    rep.add_argument("--no-mlflow", action="store_true", help="do not log the report to MLflow")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return 2 if exc.code else 0
    for d in args.sweep_dirs:
        if not os.path.isdir(d):
            print(f"error: {d}: not a directory; fix: give an isoFLOP sweep directory", file=sys.stderr)
            return 2
    print(report(args.sweep_dirs, out_dir=args.out, log_mlflow=not args.no_mlflow))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
