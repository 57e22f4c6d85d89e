"""Errors that stop a job before or after its rows run, with a message that alone tells the user
what happened: the command line prints it as one line.

`JobError`: the job as given cannot run (a configuration, input or output it refuses): fix the
command; exit code 2. `JobUnfinished`: the run stopped short, or could not start yet, for a
reason the same command gets past when run again (another run holds the output, rows missing
after the pipeline ended, the output's lease lost): exit code 3, as for any failure while
running."""


class JobError(RuntimeError):
    pass


class JobUnfinished(RuntimeError):
    pass
