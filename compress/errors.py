"""One exception type for bad input: the CLI prints its message on one line and exits with code 2."""


class CompressError(Exception):
    """A problem with the user's input (path, shape, value) that the user can fix.

    The message must name the file, tensor or field at fault and, where it helps, what to do.
    """

    exit_code = 2
