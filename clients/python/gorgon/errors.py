"""GorgonError: every failure of a gorgon call."""

import errno as _errno


class GorgonError(Exception):
    """A gorgon call failed.

    errno   -- the positive errno value (errno.EINVAL, errno.EPIPE, ...)
    message -- what was wrong: gorgond's message for the request when it
               sent one (gorgon_last_error, or a failed generation's final
               chunk), else the library's text for the errno
    """

    def __init__(self, errno, message):
        super().__init__(errno, message)
        self.errno = errno
        self.message = message

    @property
    def errno_name(self):
        return _errno.errorcode.get(self.errno, str(self.errno))

    def __str__(self):
        return "%s (%s)" % (self.message, self.errno_name)
