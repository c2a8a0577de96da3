"""The signal flags survive a signal arriving while their own handler runs.

A Slurm requeue sends every rank SIGTERM twice (Slurm's, then the batch script's), and
Python runs a second handler on top of the first, in the same thread, wherever the first
has got to.  With ``threading.Event`` flags that deadlocked a rank in about one requeue
in ten (its handler waited for the lock its own first call held).  The test replays the
worst case deterministically: a second SIGTERM at every line of the first handler.
"""

import os
import signal
import subprocess
import sys
import time

# At every line the first handler (and what it calls) runs, the handler runs again once
# more, as a second signal delivered there would run it.  A deadlock hangs the child.
NESTED = """
import signal, sys
from mpibelief.signals import Signals

s = Signals().install()
handler, depth, nested = signal.getsignal(signal.SIGTERM), [0], []

def tracer(frame, event, arg):
    if event == "line" and depth[0] == 1:
        depth[0] += 1
        handler(signal.SIGTERM, frame)
        nested.append(frame.f_code.co_name)
        depth[0] -= 1
    return tracer

sys.settrace(lambda frame, event, arg: tracer)
depth[0] = 1
handler(signal.SIGTERM, None)
sys.settrace(None)
print("set" if s.terminate.is_set() else "unset", len(nested), flush=True)
"""


def test_a_sigterm_inside_the_sigterm_handler_does_not_deadlock():
    try:
        done = subprocess.run([sys.executable, "-c", NESTED], capture_output=True,
                              text=True, timeout=10)
    except subprocess.TimeoutExpired:
        raise AssertionError("a nested SIGTERM handler deadlocked") from None
    flag, nested = done.stdout.split()
    assert done.returncode == 0 and flag == "set" and int(nested) >= 1, done


def test_sigusr1_asks_for_one_checkpoint():
    from mpibelief.signals import Signals

    s = Signals().install()
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.01)  # the handler runs at the next bytecode boundary
        assert s.take_checkpoint() and not s.take_checkpoint()
        assert not s.terminate.is_set()
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)
