"""The one error a user sees: bad input, said in one line per problem, naming the file or flag and the fix."""


class UsageError(Exception):
    """Bad input; the message (one line per problem) says which file or flag and how to fix it.

    Raised by the library (store, configuration, run directory, checkpoints); the command lines print
    it as ``error: ...`` lines and exit 2.
    """
