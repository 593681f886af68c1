"""The errors a user sees as one line, and the exit status each one gives.

``UserError``: a mistake in the input (config, data, option, a damaged file): exit status 2.
``RunStopped``: a run stopped on a signal after checkpointing its step: exit status 75
(``EX_TEMPFAIL`` of sysexits.h: "try again later"), so a scheduler can tell a preempted run,
which it should requeue with ``resume=latest``, from a broken one.
"""

EXIT_USER_ERROR = 2
EXIT_STOPPED = 75  # EX_TEMPFAIL: stopped on a signal with a checkpoint; requeue with resume=latest


class UserError(Exception):
    """A mistake in the user's input (config, data, option); printed as one line, no traceback."""

    exit_code = EXIT_USER_ERROR


class RunStopped(UserError):
    """A graceful stop on SIGINT/SIGTERM: the step was checkpointed; exit status 75."""

    exit_code = EXIT_STOPPED
