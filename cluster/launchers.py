"""The two launchers: where a list of runs (one, or the points of a sweep) goes, and what happens
before and after. Each owns its dry run, its preflight, its start or submission, and its waiting.

    launcher = launcher_for(jobs)
    launcher.preflight(jobs)           # raises LaunchRefused: one line, exit 2
    launcher.dry_run(jobs)             # print, start nothing
    code = launcher.launch(entry, jobs, hooks)

Like the rest of cluster/, this knows nothing of models or of the trainer: a run is a `Job` of plain
values (the cluster section of its config, its run directory, the args of `entry`), `entry` is the
training function, and what a sweep records about its points comes in through `SweepHooks`.
"""

from __future__ import annotations

import multiprocessing
import os
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

USER_ERROR_EXIT_CODE = 2  # the project's exit code for bad input (orchestrator/errors.py says the same)
REQUEUE_EXIT_CODE = 75    # stopped after a complete checkpoint; run again to resume (EX_TEMPFAIL)
PROJECT_ROOT = str(Path(__file__).resolve().parent.parent)


class LaunchRefused(RuntimeError):
    """A request the launcher refuses before starting anything (one line: `key=value: ...; fix: ...`)."""


@dataclass
class Job:
    """One training run, as the launcher sees it."""

    name: str                  # run.name (Slurm job name, local run id)
    run_dir: str
    cluster: dict[str, Any]    # the run's `cluster` config section
    args: tuple                # entry(*args) runs the training
    config: dict[str, Any]     # the whole config, printed by a dry run
    num: Optional[int] = None  # the job number within a sweep
    overrides: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, config: dict[str, Any], num: Optional[int] = None, overrides: Optional[list[str]] = None) -> "Job":
        """The job that trains `config` (a whole config as a plain dict) with entry(config)."""
        return cls(config["run"]["name"], config["run"]["dir"], config["cluster"], (config,), config, num,
                   list(overrides or []))

    @property
    def label(self) -> str:
        return f"sweep point {self.num}: {' '.join(self.overrides)}" if self.num is not None else "resolved config"


@dataclass
class SweepHooks:
    """What a sweep does around its points (orchestrator/sweep.py): nothing for a single run."""

    sweep_dir: Optional[str] = None
    before_start: Callable[[], None] = lambda: None                 # e.g. create the tracking store once
    on_started: Callable[[Job, Optional[str]], None] = lambda job, job_id: None  # job id on Slurm
    summary: Callable[[bool], None] = lambda finished: None        # table of the points at the end


def _print_configs(jobs: list[Job]) -> None:
    import yaml

    for job in jobs:
        print(f"# ---- {job.label}")
        print(yaml.safe_dump(job.config, sort_keys=False, default_flow_style=False).rstrip())


class LocalLauncher:
    """Processes on this machine: one run in this process (N == 1) or torch elastic's agent (N > 1);
    the points of a sweep one after the other, each in a fresh process."""

    def preflight(self, jobs: list[Job]) -> None:
        pass  # this machine is the one that trains: the config's own checks saw it

    def dry_run(self, jobs: list[Job]) -> None:
        _print_configs(jobs)
        print(f"dry run: would train {len(jobs)} run(s) here with {jobs[0].cluster['nodes'] * jobs[0].cluster['nproc_per_node']} "
              "process(es) each; nothing started (cluster.dry_run=true)")

    def launch(self, entry: Callable[..., Any], jobs: list[Job], hooks: SweepHooks) -> int:
        if hooks.sweep_dir is None:
            return run_here(entry, jobs[0])
        hooks.before_start()
        worst = 0
        for job in jobs:
            hooks.on_started(job, None)
            # A fresh process per point: DeepSpeed keeps process-wide state (its groups) that a
            # second run in the same interpreter would trip over.
            child = multiprocessing.get_context("spawn").Process(target=_run_point, args=(entry, job))
            child.start()
            child.join()
            code = child.exitcode if child.exitcode is not None and child.exitcode >= 0 else 1
            worst = worst or code
        hooks.summary(True)
        return worst


def _run_point(entry: Callable[..., Any], job: Job) -> None:
    sys.exit(run_here(entry, job))


def run_here(entry: Callable[..., Any], job: Job) -> int:
    """Train `job` on this machine; the exit code (0, 2 for user errors, 75 after a stop signal, ...)."""
    from cluster.local import LaunchError, run_local
    from cluster.rendezvous import HostSpec

    cluster = job.cluster
    try:
        run_local(entry, job.args, cluster["nproc_per_node"], run_id=job.name,
                  log_dir=os.path.join(job.run_dir, "logs"),
                  shutdown_timeout_s=cluster["shutdown_grace_s"], hosts=HostSpec.from_cluster(cluster),
                  # a SIGTERM waits for a save in progress, at most as long as its collectives may take
                  save_limit_s=cluster["collective_timeout_s"],
                  save_markers_dir=os.path.join(job.run_dir, "logs", "saving"))
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
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return 0


class SlurmLauncher:
    """Slurm through submitit: one job, or one job array per distinct cluster request of a sweep."""

    def preflight(self, jobs: list[Job]) -> None:
        from cluster.slurm import SlurmError, preflight

        for group in _by_request(jobs):
            job = group[0]
            _check_gpus_in_partition(job.cluster)
            try:
                preflight(job.cluster, job.name, _slurm_folder(job.run_dir), job_setup())
            except SlurmError as exc:
                raise LaunchRefused(str(exc)) from None

    def dry_run(self, jobs: list[Job]) -> None:
        from cluster.slurm import sbatch_script

        _print_configs(jobs)
        first = jobs[0]
        sweep = first.num is not None
        folder = "<sweep dir>/slurm" if sweep else _slurm_folder(first.run_dir)
        print("# ---- sbatch script" + (f" (one job array of {len(jobs)} jobs)" if len(jobs) > 1 else ""))
        print(sbatch_script(first.cluster, first.name, folder, job_setup(), array_size=len(jobs)).rstrip())
        print("dry run: nothing submitted (cluster.dry_run=true); drop it to submit")

    def launch(self, entry: Callable[..., Any], jobs: list[Job], hooks: SweepHooks) -> int:
        from cluster import slurm

        if hooks.sweep_dir:
            hooks.before_start()
        submitted = []
        for group in _by_request(jobs):
            first = group[0]
            folder = os.path.join(hooks.sweep_dir, "slurm") if hooks.sweep_dir else _slurm_folder(first.run_dir)
            name = os.path.basename(hooks.sweep_dir) if hooks.sweep_dir else first.name
            try:
                array = slurm.submit_array(entry, [j.args for j in group], first.cluster, job_name=name, folder=folder,
                                           requeue_exit_code=REQUEUE_EXIT_CODE, setup=job_setup())
            except slurm.SlurmError as exc:
                raise LaunchRefused(str(exc)) from None
            for slurm_job, job in zip(array, group):
                stdout, stderr = slurm.log_paths(slurm_job)
                label = f"sweep point {job.num}: " if job.num is not None else ""
                c = job.cluster
                print(f"{label}submitted Slurm job {slurm_job.job_id} ({c['nodes']} node(s) x {c['nproc_per_node']} "
                      f"task(s), partition {c.get('partition') or '(default)'})\n"
                      f"  run dir:    {os.path.abspath(job.run_dir)}\n"
                      f"  rank 0 log: {stdout}\n  rank 0 err: {stderr}", flush=True)
                hooks.on_started(job, slurm_job.job_id)
                submitted.append((slurm_job, job))
        if not all(job.cluster["wait"] for _, job in submitted):
            first = submitted[0][0]
            follow = (f"python -m orchestrator.sweep {hooks.sweep_dir}" if hooks.sweep_dir
                      else f"tail -f {slurm.log_paths(first)[0]}")
            print(f"follow: {follow}; state: sacct -j {first.job_id.split('_')[0]}", flush=True)
            hooks.summary(False)
            return 0
        results = slurm.wait([s for s, _ in submitted], stream=hooks.sweep_dir is None)
        worst = 0
        for (slurm_job, _), (state, code) in zip(submitted, results):
            status = slurm.exit_status(state, code)
            why = slurm.job_error(slurm_job) if status else ""
            print(f"job {slurm_job.job_id}: {state}" + (f" (exit {code})" if status else "") + (f": {why}" if why else ""),
                  file=sys.stderr if status else sys.stdout, flush=True)
            worst = worst or status
        hooks.summary(True)
        return worst


def _check_gpus_in_partition(cluster: dict[str, Any]) -> None:
    """A GPU request on a partition whose nodes have no GPU GRES (as `sinfo` reports it) is refused
    here, in words, before sbatch would refuse it with a generic "invalid generic resource"."""
    import shutil
    import subprocess

    if not cluster.get("gpus_per_node") or shutil.which("sinfo") is None:
        return
    partition = cluster.get("partition")
    command = ["sinfo", "-h", "-o", "%P|%G"] + (["-p", partition] if partition else [])
    rows = [line.split("|", 1) for line in subprocess.run(command, capture_output=True, text=True, timeout=30)
            .stdout.splitlines() if "|" in line]
    if partition is None:  # the default partition is the one sinfo marks with '*'
        rows = [r for r in rows if r[0].endswith("*")] or rows
    gres = sorted({r[1].strip() for r in rows})
    if rows and not any("gpu" in g for g in gres):
        name = partition or rows[0][0].rstrip("*")
        raise LaunchRefused(f"cluster.gpus_per_node={cluster['gpus_per_node']}: partition {name!r} has no GPUs "
                            f"(its nodes' GRES: {', '.join(gres)}); fix: pick a partition with gpu GRES "
                            "(sinfo -o '%P %G') or set cluster.gpus_per_node=0")


def _by_request(jobs: list[Job]) -> list[list[Job]]:
    """Jobs grouped by identical cluster request (one job array each), in first-seen order."""
    groups: dict[str, list[Job]] = {}
    for job in jobs:
        groups.setdefault(repr(sorted(job.cluster.items())), []).append(job)
    return list(groups.values())


def job_setup() -> list[str]:
    """Shell lines of a Slurm batch script before the processes start: the project importable
    from the job whether or not it was pip-installed."""
    return [f"export PYTHONPATH={shlex.quote(PROJECT_ROOT)}${{PYTHONPATH:+:$PYTHONPATH}}"]


def _slurm_folder(run_dir: str) -> str:
    return os.path.join(os.path.abspath(run_dir), "slurm")


def launcher_for(jobs: list[Job]):
    """The launcher of these jobs' cluster.kind (one kind for all: a sweep runs on one cluster)."""
    kinds = sorted({job.cluster["kind"] for job in jobs})
    if len(kinds) > 1:
        raise LaunchRefused(f"cluster.kind={','.join(kinds)}: one sweep runs on one kind of cluster; "
                            "fix: run one sweep per cluster")
    return {"local": LocalLauncher, "slurm": SlurmLauncher}[kinds[0]]()
