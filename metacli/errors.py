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


class Preempted(Exception):
    """The run was asked to stop (SIGTERM/SIGUSR1) and saved a checkpoint: exit for a requeue, not an error."""
