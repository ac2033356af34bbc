"""The one error type users see for bad input: one line naming the key, the value and the fix."""

from __future__ import annotations

USER_ERROR_EXIT_CODE = 2
# A run stopped by SIGTERM or SIGUSR2 after saving a complete checkpoint exits with this code
# (sysexits' EX_TEMPFAIL): "not finished, nothing lost, run me again" -- a launcher requeues on it.
REQUEUE_EXIT_CODE = 75


class ConfigError(ValueError):
    """A refused setting. `str()` is one line: `<key>=<value>: <problem>; fix: <fix>`."""

    def __init__(self, key: str, value: object, problem: str, fix: str):
        self.key, self.value, self.problem, self.fix = key, value, problem, fix
        super().__init__(f"{key}={_show(value)}: {problem}; fix: {fix}")


def _show(value: object) -> str:
    text = repr(value) if isinstance(value, str) else str(value)
    text = text.replace("\n", " ")
    return text if len(text) <= 120 else text[:117] + "..."


def one_line_compose_error(text: str, overrides: list[str], conf_dir: str) -> str:
    """Hydra's multi-line composition error (unknown key, unknown option of a config group, ...)
    as one `key=value: problem; fix: ...` line (launch.py prints it and exits with code 2)."""
    from pathlib import Path

    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if "Could not find '" in text:  # unknown option of a config group, e.g. model=foo
        missing = text.split("Could not find '")[1].split("'")[0]
        group, _, option = missing.rpartition("/")
        options = sorted(p.stem for p in (Path(conf_dir) / group).glob("*.yaml")) if group else []
        return f"{group}={option}: unknown option of config group '{group}'; fix: use one of {', '.join(options)}"
    if "Could not override '" in text:  # unknown key
        key = text.split("Could not override '")[1].split("'")[0]
        value = next((o.split("=", 1)[1] for o in overrides if o.split("=")[0].lstrip("+~") == key), "?")
        return (f"{key}={value}: unknown key; fix: check the spelling against `python launch.py --cfg job` "
                f"(docs of every key: `python -m orchestrator.config`)")
    return " ".join(lines) + "; fix: check the overrides"
