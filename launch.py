"""Train a language model with PEER, MoE or dense FFNs.

    python launch.py                                   # default experiment: small PEER LM, CPU, 1 process
    python launch.py model=moe trainer.max_steps=50    # any Hydra override
    python launch.py cluster.nproc_per_node=2 parallel.dp=2
    python launch.py cluster=slurm cluster.partition=gpu cluster.nproc_per_node=8 cluster.gpus_per_node=8 parallel.dp=8
    python launch.py -m optim.lr=1e-3,3e-3             # a sweep: one run per point, then a table of losses
    python launch.py experiment=isoflop isoflop.budget=2e13   # isoFLOP study: planned sweep + report
    python launch.py cluster.dry_run=true ...          # print what would run (sbatch script), start nothing
    python launch.py --cfg job                         # print the composed config
    python launch.py --help                            # config groups; every key's doc: python -m orchestrator.config

The only place that sees Hydra's DictConfig: it is turned into plain dataclasses here, validated,
and handed to a launcher. Bad input exits with code 2 and one line, before any process starts.
"""

from __future__ import annotations

import copy
import os
import shlex
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from orchestrator.config import TrainConfig, load_config, to_dict, validate
from orchestrator.errors import REQUEUE_EXIT_CODE, USER_ERROR_EXIT_CODE, ConfigError

CONF_DIR = str(Path(__file__).resolve().parent / "conf")
# Hydra flags that take a value in the next argument.
_FLAGS_WITH_VALUE = {"--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd",
                     "--experimental-rerun", "--package", "-p"}
_INFO_FLAGS = {"--cfg", "-c", "--help", "-h", "--hydra-help", "--info", "-i", "--resolve",
               "--shell-completion", "-sc", "--version"}


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(USER_ERROR_EXIT_CODE)


def to_train_config(cfg: DictConfig) -> TrainConfig:
    """DictConfig -> validated TrainConfig; ConfigError on any bad value."""
    try:
        raw = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as exc:
        key = exc.full_key or "?"
        raise ConfigError(key, "???", "is required and has no value", f"set {key}=<value> on the command line")
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "?"
        raise ConfigError(key, "?", str(exc).splitlines()[0], "fix the interpolation or value of this key")
    train_cfg = load_config(raw)
    import torch  # late: keeps `--help` fast

    validate(train_cfg, cuda_device_count=torch.cuda.device_count())
    return train_cfg


def _precheck(argv: list[str]) -> list[str]:
    """Compose and validate before Hydra's own run, so that every refusal is one line, exit 2.

    Hydra reports composition errors (unknown key, unknown group option, bad override syntax) over
    several lines with exit code 1; we compose the same overrides first and translate. A sweep
    (-m) is expanded as Hydra's basic sweeper does and every point is checked before any starts:
    one bad point refuses the whole sweep. For cluster=slurm, what Slurm would refuse (no sbatch,
    an unknown partition, a rejected request) is found here too. A dry run prints and exits here.

    Returns the arguments for Hydra: those given, except that an isoFLOP study (isoflop settings
    without isoflop.point) becomes a sweep over the points of its plan (orchestrator/isoflop.py).
    """
    if any(a.split("=")[0] in _INFO_FLAGS for a in argv):
        return argv  # info flags start nothing
    multirun = any(a in ("-m", "--multirun") for a in argv)
    overrides, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in _FLAGS_WITH_VALUE:
            skip = True
        elif not arg.startswith("-"):
            overrides.append(arg)
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException, OverrideParseException

    parser = OverridesParser.create()
    for override in overrides:
        try:
            parser.parse_overrides([override])
        except OverrideParseException:
            fail(f"{override}: not a valid override; fix: write key=value (quote values with spaces or brackets)")
    points = _sweep_points(overrides) if multirun else [overrides]
    if multirun:
        os.environ[_SWEPT_KEYS_ENV] = ",".join(sorted(_swept_keys(overrides)))
    checked: list[tuple[list[str], TrainConfig]] = []
    plan_sizes = set()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        for num, point in enumerate(points):
            where = f"sweep point {num} ({' '.join(point)}): " if multirun else ""
            try:
                cfg = compose(config_name="config", overrides=point)
            except (HydraException, OmegaConfBaseException) as exc:
                fail(where + _one_line_hydra_error(exc, point))
            try:
                expanded = _isoflop_expand(cfg, point)
                if expanded is None:
                    checked.append((point, to_train_config(cfg)))
                else:
                    checked += expanded
                    plan_sizes.add(len(expanded))
            except ConfigError as exc:
                fail(where + str(exc))
    if plan_sizes:
        if len(plan_sizes) > 1:
            fail(f"{' '.join(overrides)}: the swept values give isoFLOP plans of different sizes "
                 f"({sorted(plan_sizes)} points); fix: sweep only keys that keep isoflop.methods and isoflop.ladder")
        argv = (argv if multirun else ["-m", *argv]) + [
            "isoflop.point=" + ",".join(str(i) for i in range(plan_sizes.pop()))]
        os.environ[_SWEPT_KEYS_ENV] = ",".join(sorted(_swept_keys(overrides) | {"isoflop.point"}))
        multirun = True
    if any(c.cluster.dry_run for _, c in checked):
        _dry_run(checked, multirun)
        sys.exit(0)
    _slurm_preflight([c for _, c in checked], multirun)
    return argv


def _isoflop_expand(cfg: DictConfig, overrides: list[str]) -> list[tuple[list[str], TrainConfig]] | None:
    """An isoFLOP study's points, each checked: None unless `cfg` has isoflop settings and no
    isoflop.point (a single point is applied and checked like any run, see main)."""
    if cfg.get("isoflop") is None:
        return None
    if cfg.isoflop.get("point") is not None:
        return [(overrides, to_train_config(_apply_isoflop_point(cfg)[0]))]
    from orchestrator.isoflop import format_plan, plan

    to_train_config(cfg)  # the base config first: its own errors name its own keys
    raw = OmegaConf.to_container(cfg, resolve=True)
    planned = plan(raw)
    print(f"isoFLOP plan: {len(planned)} points at {cfg.isoflop.budget:.4g} training FLOPs each"
          + (f" ({' '.join(overrides)})" if overrides else "") + "\n" + format_plan(planned), flush=True)
    out = []
    for p in planned:
        point_cfg = copy.deepcopy(cfg)
        _set_keys(point_cfg, {**p.overrides, "isoflop.point": p.index})
        out.append((overrides + p.override_strings(), to_train_config(point_cfg)))
    return out


def _set_keys(cfg: DictConfig, values: dict) -> None:
    from omegaconf import open_dict

    with open_dict(cfg):
        for key, value in values.items():
            OmegaConf.update(cfg, key, value, merge=False)


def _apply_isoflop_point(cfg: DictConfig) -> tuple[DictConfig, list[str]]:
    """With isoflop.point set: the config with that point's planned overrides (re-planned from the
    config, so each point of the sweep finds its own), and the overrides as strings."""
    if cfg.get("isoflop") is None or cfg.isoflop.get("point") is None:
        return cfg, []
    from orchestrator.isoflop import point_config

    try:
        _, point = point_config(OmegaConf.to_container(cfg, resolve=True))
    except ConfigError as exc:
        fail(str(exc))
    _set_keys(cfg, point.overrides)
    return cfg, point.override_strings()


def _sweep_points(overrides: list[str]) -> list[list[str]]:
    """Every point of a sweep, as the overrides of one run, in Hydra's job-number order."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
        batches = BasicSweeper.split_arguments(parsed, None)
    except HydraException as exc:
        fail(f"{' '.join(overrides)}: {str(exc).splitlines()[0]}; fix: sweep with a=1,2 or a=range(1,4) "
             "(one list of values per key)")
    return [list(point) for batch in batches for point in batch]


# The keys a sweep varies, found by _precheck, for the points' tags and the summary table.
_SWEPT_KEYS_ENV = "PEERLAB_SWEPT_KEYS"


def _swept_keys(overrides: list[str]) -> set[str]:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return {o.get_key_element() for o in OverridesParser.create().parse_overrides(overrides)
            if o.is_sweep_override()}


def _job_setup() -> list[str]:
    """Shell lines of a Slurm batch script before the processes start: the project importable
    from the job whether or not it was pip-installed."""
    here = str(Path(__file__).resolve().parent)
    return [f"export PYTHONPATH={shlex.quote(here)}${{PYTHONPATH:+:$PYTHONPATH}}"]


def _slurm_folder(run_dir: str) -> str:
    return os.path.join(os.path.abspath(run_dir), "slurm")


def _dry_run(checked: list[tuple[list[str], TrainConfig]], multirun: bool) -> None:
    """cluster.dry_run=true: print what would run; submit, start and write nothing."""
    from cluster.slurm import sbatch_script

    first = checked[0][1]
    for num, (point, cfg) in enumerate(checked):
        head = f"sweep point {num}: {' '.join(point)}" if multirun else "resolved config"
        print(f"# ---- {head}" + (" (run.dir: <sweep dir>/%d)" % num if multirun else ""))
        print(OmegaConf.to_yaml(OmegaConf.create(to_dict(cfg))).rstrip())
    if first.cluster.kind == "slurm":
        folder = _slurm_folder(first.run.dir) if not multirun else "<sweep dir>/slurm"
        print("# ---- sbatch script" + (f" (one job array of {len(checked)} jobs)" if len(checked) > 1 else ""))
        print(sbatch_script(to_dict(first)["cluster"], first.run.name, folder, _job_setup(),
                            array_size=len(checked)).rstrip())
        print("dry run: nothing submitted (cluster.dry_run=true); drop it to submit")
    else:
        world = first.world_size
        print(f"dry run: would train {len(checked)} run(s) here with {world} process(es) each; nothing started "
              "(cluster.dry_run=true)")


def _slurm_preflight(cfgs: list[TrainConfig], multirun: bool) -> None:
    from cluster.slurm import SlurmError, preflight

    seen = set()
    for cfg in cfgs:
        if cfg.cluster.kind != "slurm":
            continue
        cluster = to_dict(cfg)["cluster"]
        key = repr(sorted(cluster.items()))
        if key in seen:
            continue
        seen.add(key)
        try:
            preflight(cluster, cfg.run.name, _slurm_folder(cfg.run.dir), _job_setup())
        except SlurmError as exc:
            fail(str(exc))


def _one_line_hydra_error(exc: Exception, overrides: list[str]) -> str:
    text = str(exc)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if "Could not find '" in text:  # unknown option of a config group, e.g. model=foo
        missing = text.split("Could not find '")[1].split("'")[0]
        group, _, option = missing.rpartition("/")
        options = sorted(p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml")) if group else []
        return f"{group}={option}: unknown option of config group '{group}'; fix: use one of {', '.join(options)}"
    if "Could not override '" in text:  # unknown key
        key = text.split("Could not override '")[1].split("'")[0]
        value = next((o.split("=", 1)[1] for o in overrides if o.split("=")[0].lstrip("+~") == key), "?")
        return (f"{key}={value}: unknown key; fix: check the spelling against `python launch.py --cfg job` "
                f"(docs of every key: `python -m orchestrator.config`)")
    return " ".join(lines) + "; fix: check the overrides"


# The points of a sweep seen by main(): (train config, config dict, overrides, exit code or None).
_SWEEP: list[dict] = []


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    cfg, isoflop_overrides = _apply_isoflop_point(cfg)
    point = _sweep_point(cfg, isoflop_overrides)
    try:
        train_cfg = to_train_config(cfg)
    except ConfigError as exc:
        fail(str(exc))
    cfg_dict = to_dict(train_cfg)
    if point is not None:
        from orchestrator.sweep import prepare_tracking_store, write_point

        write_point(train_cfg.run.dir, point["sweep_id"], point["num"], point["overrides"])
        point.update(cfg=train_cfg, cfg_dict=cfg_dict, code=None)
        _SWEEP.append(point)
        if train_cfg.cluster.kind == "slurm":
            return  # every point is submitted together (one job array) once Hydra has seen them all
        if len(_SWEEP) == 1 and train_cfg.tracking.enabled:
            prepare_tracking_store(train_cfg.tracking.uri, train_cfg.tracking.experiment, train_cfg.run.root)
        # Each point in a fresh process: DeepSpeed keeps process-wide state (its groups) that a
        # second run in the same interpreter would trip over.
        import multiprocessing

        child = multiprocessing.get_context("spawn").Process(target=_run_point, args=(train_cfg, cfg_dict))
        child.start()
        child.join()
        point["code"] = child.exitcode if child.exitcode is not None and child.exitcode >= 0 else 1
        return
    if train_cfg.cluster.kind == "slurm":
        sys.exit(_submit_slurm([train_cfg], [cfg_dict], sweep_dir=None))
    sys.exit(_run_here(train_cfg, cfg_dict, in_sweep=False))


def _sweep_point(cfg: DictConfig, extra_overrides: list[str]) -> dict | None:
    """In a sweep (-m), give this point its own run.dir (<sweep dir>/<job number>) and run.name
    (unless the sweep sets them) and tag its MLflow run with the sweep id and its overrides
    (plus `extra_overrides`: an isoFLOP point's planned ones)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import open_dict

    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return None
    swept = set(filter(None, os.environ.get(_SWEPT_KEYS_ENV, "").split(",")))
    overrides = [o for o in hc.overrides.task if o.split("=", 1)[0] in swept] or list(hc.overrides.task)
    overrides += extra_overrides
    sweep_dir = os.path.abspath(str(hc.sweep.dir))
    sweep_id, num = os.path.basename(sweep_dir), int(hc.job.num)
    keys = {o.split("=", 1)[0].lstrip("+~") for o in hc.overrides.task}
    with open_dict(cfg):
        if "run.dir" not in keys:
            cfg.run.dir = str(hc.runtime.output_dir)
        if "run.name" not in keys:
            cfg.run.name = f"{sweep_id}_{num}"
        cfg.tracking.tags = list(cfg.tracking.tags) + [
            f"sweep.id={sweep_id}", f"sweep.num={num}", "sweep.overrides=" + " ".join(overrides)]
    return {"sweep_id": sweep_id, "sweep_dir": sweep_dir, "num": num, "overrides": overrides}


def _run_point(train_cfg: TrainConfig, cfg_dict: dict) -> None:
    sys.exit(_run_here(train_cfg, cfg_dict, in_sweep=False))


def _run_here(train_cfg: TrainConfig, cfg_dict: dict, in_sweep: bool) -> int:
    """Train on this machine; the exit code (0, 2 for user errors, 75 after a stop signal, ...)."""
    from cluster.local import LaunchError, run_local
    from cluster.rendezvous import HostSpec
    from orchestrator.train import train_main

    try:
        run_local(train_main, (cfg_dict,), train_cfg.cluster.nproc_per_node,
                  run_id=train_cfg.run.name, log_dir=os.path.join(train_cfg.run.dir, "logs"), hosts=HostSpec.from_cluster(cfg_dict["cluster"]))
    except LaunchError as exc:
        if exc.exit_code == USER_ERROR_EXIT_CODE:
            pass  # the worker already printed its one-line error
        elif exc.exit_code == REQUEUE_EXIT_CODE:
            print(f"stopped by a signal after a complete checkpoint; run the same command to resume "
                  f"(exit {REQUEUE_EXIT_CODE})", file=sys.stderr)
        else:
            print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code or 1
    except SystemExit as exc:  # one process runs in this one: its sys.exit(2 or 75) lands here
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if not in_sweep or code == 0:
            raise
        return code
    return 0


def _submit_slurm(cfgs: list[TrainConfig], cfg_dicts: list[dict], sweep_dir: str | None,
                  nums: list[int] | None = None) -> int:
    """Submit one job (or one array for the points of a sweep), print where everything is, and
    with cluster.wait=true follow it to the end; the exit code of the launcher."""
    from cluster import slurm
    from orchestrator.train import train_main

    first = cfgs[0]
    cluster = cfg_dicts[0]["cluster"]
    folder = os.path.join(sweep_dir, "slurm") if sweep_dir else _slurm_folder(first.run.dir)
    name = os.path.basename(sweep_dir) if sweep_dir else first.run.name
    if sweep_dir and first.tracking.enabled:
        from orchestrator.sweep import prepare_tracking_store

        prepare_tracking_store(first.tracking.uri, first.tracking.experiment, first.run.root)
    try:
        jobs = slurm.submit_array(train_main, [(d,) for d in cfg_dicts], cluster, job_name=name, folder=folder,
                                  requeue_exit_code=REQUEUE_EXIT_CODE, setup=_job_setup())
    except slurm.SlurmError as exc:
        fail(str(exc))
    for i, (job, cfg) in enumerate(zip(jobs, cfgs)):
        stdout, stderr = slurm.log_paths(job)
        label = f"sweep point {nums[i]}: " if nums else ""
        print(f"{label}submitted Slurm job {job.job_id} ({cfg.cluster.nodes} node(s) x {cfg.cluster.nproc_per_node} "
              f"task(s), partition {cfg.cluster.partition or '(default)'})\n"
              f"  run dir:    {os.path.abspath(cfg.run.dir)}\n"
              f"  rank 0 log: {stdout}\n  rank 0 err: {stderr}", flush=True)
    if sweep_dir:
        from orchestrator.sweep import write_point

        for job, cfg, num in zip(jobs, cfgs, nums or []):
            point = next(p for p in _SWEEP if p["num"] == num)
            write_point(cfg.run.dir, point["sweep_id"], num, point["overrides"], job_id=job.job_id)
    if not cluster["wait"]:
        follow = f"python -m orchestrator.sweep {sweep_dir}" if sweep_dir else f"tail -f {slurm.log_paths(jobs[0])[0]}"
        print(f"follow: {follow}; state: sacct -j {jobs[0].job_id.split('_')[0]}", flush=True)
        return 0
    results = slurm.wait(jobs, stream=sweep_dir is None)
    worst = 0
    for job, (state, code) in zip(jobs, results):
        status = slurm.exit_status(state, code)
        why = slurm.job_error(job) if status else ""
        print(f"job {job.job_id}: {state}" + (f" (exit {code})" if status else "") + (f": {why}" if why else ""),
              file=sys.stderr if status else sys.stdout, flush=True)
        worst = worst or status
    return worst


def _finish_sweep() -> int:
    """After Hydra has gone through every point: submit the Slurm points (one job array per
    distinct cluster request), then for a blocking sweep print the table of final losses."""
    from orchestrator.sweep import table

    sweep_dir = _SWEEP[0]["sweep_dir"]
    slurm_points = [p for p in _SWEEP if p["cfg"].cluster.kind == "slurm"]
    groups: dict[str, list[dict]] = {}
    for p in slurm_points:
        groups.setdefault(repr(sorted(p["cfg_dict"]["cluster"].items())), []).append(p)
    status = 0
    for group in groups.values():
        code = _submit_slurm([p["cfg"] for p in group], [p["cfg_dict"] for p in group], sweep_dir,
                             nums=[p["num"] for p in group])
        status = status or code
    local_codes = [p["code"] for p in _SWEEP if p["cfg"].cluster.kind != "slurm"]
    status = status or next((c for c in local_codes if c), 0)
    isoflop = any(p["cfg"].isoflop is not None for p in _SWEEP)
    if not slurm_points or all(p["cfg"].cluster.wait for p in slurm_points):
        print(table(sweep_dir), flush=True)
        if isoflop:
            from orchestrator.isoflop import report

            print(report(sweep_dir), flush=True)
    else:
        print(f"table of final losses once the jobs are done: python -m orchestrator.sweep {sweep_dir}", flush=True)
        if isoflop:
            print(f"isoFLOP report once the jobs are done: python -m orchestrator.isoflop report {sweep_dir}", flush=True)
    return status


if __name__ == "__main__":
    sys.argv[1:] = _precheck(sys.argv[1:])
    main()
    if _SWEEP:
        sys.exit(_finish_sweep())
