"""The signal handling around training (glmport.train.signals.GracefulStop), signal by signal: the kernel's
repeated SIGHUP when a launcher dies counts once, a second SIGTERM aborts, and ``nohup`` is respected."""

import os
import signal

import pytest

from glmport.errors import SignalInterrupt
from glmport.train.signals import GracefulStop


def test_repeated_sighup_from_a_dead_launcher_counts_once_and_a_second_sigterm_still_aborts():
    previous = signal.signal(signal.SIGHUP, signal.SIG_DFL)  # as in a rank (a test runner's worker may ignore it)
    try:
        with GracefulStop() as stop:
            for _ in range(3):
                os.kill(os.getpid(), signal.SIGHUP)
            assert stop.requested == "SIGHUP"
            with pytest.raises(SignalInterrupt, match="second signal"):
                os.kill(os.getpid(), signal.SIGTERM)
    finally:
        signal.signal(signal.SIGHUP, previous)


def test_hangups_ignored_before_training_stay_ignored():
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with GracefulStop() as stop:
            assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGHUP)
            assert stop.requested is None
            assert signal.getsignal(signal.SIGTERM) == stop._on_signal
        assert signal.getsignal(signal.SIGTERM) != stop._on_signal  # restored
    finally:
        signal.signal(signal.SIGHUP, previous)
