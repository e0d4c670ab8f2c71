"""User-facing errors: each carries one line that names the problem and the fix."""


class MetacliError(Exception):
    """An error caused by the user's input (config, data, checkpoint), reported as one line without a traceback."""


class ConfigError(MetacliError):
    """A config value is missing, of the wrong type, or out of range."""


class DataError(MetacliError):
    """A dataset is missing, corrupt, or cannot give the episodes the config asks for."""


class CheckpointError(MetacliError):
    """A run dir or checkpoint is missing, unreadable, or does not match the config."""


class TrainingError(MetacliError):
    """Training cannot go on (for example the loss became NaN)."""


class ProcessesLost(TrainingError):
    """Another process of a multi-process run stopped answering (it died, or its machine did)."""


class Preempted(Exception):
    """The run was asked to stop (SIGTERM, SIGUSR1, SIGINT) and its checkpoint is complete: exit for a requeue or
    at the user's request, not an error. ``signal_name`` picks the exit code."""

    def __init__(self, message: str, signal_name: str = "SIGTERM") -> None:
        super().__init__(message)
        self.signal_name = signal_name
