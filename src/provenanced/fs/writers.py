"""Whether anyone holds a file open for writing, asked of the kernel with a read lease."""

from __future__ import annotations

import fcntl
import signal

# A lease broken in the instant we hold one signals its holder, by default with SIGIO, whose
# default action ends the process; SIGURG's default action is to ignore it.
_BREAK_SIGNAL = signal.SIGURG


def open_for_writing(fd: int) -> bool:
    """True while any process holds the file behind ``fd`` (opened read-only) open for writing.

    Why a lease rather than a scan of /proc/*/fd: the kernel refuses a read lease with EAGAIN
    exactly when the inode is open for writing anywhere (fs/locks.c, check_conflicting_open), in
    one call, for every process on the machine; a scan costs a readlink per descriptor of every
    process and, run as the user, sees only the user's own. The lease needs the file's owner or
    CAP_LEASE and a file system that grants leases (fs/locks.c, generic_setlease); otherwise
    this raises OSError (EACCES, EINVAL) and the caller must assume the worst.
    """
    fcntl.fcntl(fd, fcntl.F_SETSIG, _BREAK_SIGNAL)
    try:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
    except BlockingIOError:  # EAGAIN: someone has it open for writing
        return True
    # Held for an instant: a writer opening meanwhile waits for this line, no longer.
    fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
    return False
