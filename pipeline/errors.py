"""Errors that stop a job before or after its rows run: the message alone tells the user what
to fix, so the command line prints it as one line and exits with code 2."""


class JobError(RuntimeError):
    pass
