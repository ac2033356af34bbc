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
