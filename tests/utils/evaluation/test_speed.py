"""round_robin_ms, Timing and cpu_threads: timings on the CPU threads asked for, the process's threads given back
after."""
import pytest
import torch

from utils.evaluation.speed import Timing, cpu_threads, round_robin_ms


def test_round_robin_times_every_callable_on_the_threads_asked_and_gives_them_back():
    before = torch.get_num_threads()
    asked = 2 if before == 1 else 1  # not what the process runs on, so that the test can fail
    seen = []
    ms = round_robin_ms({"a": lambda: seen.append(torch.get_num_threads()), "b": lambda: None}, reps=3,
                        device=torch.device("cpu"), threads=asked)
    assert set(ms) == {"a", "b"} and all(v >= 0 for v in ms.values())
    assert seen == [asked] * 5  # two warm-up calls and three timed ones
    assert torch.get_num_threads() == before


def test_cpu_threads_are_given_back_after_an_error_and_left_alone_with_none():
    before = torch.get_num_threads()
    asked = 2 if before == 1 else 1
    with pytest.raises(RuntimeError):
        with cpu_threads(asked):
            assert torch.get_num_threads() == asked
            raise RuntimeError("stop")
    assert torch.get_num_threads() == before
    with cpu_threads(None):
        assert torch.get_num_threads() == before


def test_timing_times_with_its_reps_on_its_threads_and_says_which():
    before = torch.get_num_threads()
    asked = 2 if before == 1 else 1
    seen = []
    timing = Timing(reps=4, batch=1, seq=8, threads=asked)
    assert set(timing.ms({"a": lambda: seen.append(torch.get_num_threads())}, torch.device("cpu"))) == {"a"}
    assert seen == [asked] * 6 and timing.threads_used() == asked
    assert torch.get_num_threads() == before and Timing().threads_used() == before
