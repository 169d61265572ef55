"""round_robin_ms, Timing and cpu_threads: timings on the CPU threads asked for, the process's threads given back
after; the machine's load logged beside a timing and said in words."""
import os

import pytest
import torch

from utils.evaluation.speed import LoadLog, Timing, cpu_threads, load_text, round_robin_ms, usable_cpus


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


@pytest.mark.skipif(not hasattr(os, "getloadavg"), reason="no load average on this system")
def test_a_timing_logs_the_load_before_its_warm_up_and_after_each_round(monkeypatch):
    loads = iter([0.5, 3.25, 1.0, 2.0])
    monkeypatch.setattr(os, "getloadavg", lambda: (next(loads), 0.0, 0.0))
    load = LoadLog()
    Timing(reps=3, batch=1, seq=8, threads=1).ms({"a": lambda: None, "b": lambda: None}, torch.device("cpu"),
                                                 load=load)
    assert load.samples == [0.5, 3.25, 1.0, 2.0]  # before the warm-up, then one per round (not per callable)
    assert load.summary() == {"load_1min_min": 0.5, "load_1min_max": 3.25, "cpus": usable_cpus()}
    assert usable_cpus() == len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else usable_cpus() >= 1


def test_a_timing_without_a_load_log_reads_no_load(monkeypatch):
    monkeypatch.setattr(os, "getloadavg", lambda: pytest.fail("read the load with no log to keep it"))
    round_robin_ms({"a": lambda: None}, reps=2, device=torch.device("cpu"))


def test_a_system_without_a_load_average_logs_nothing(monkeypatch):
    monkeypatch.delattr(os, "getloadavg", raising=False)
    load = LoadLog()
    round_robin_ms({"a": lambda: None}, reps=2, device=torch.device("cpu"), load=load)
    assert load.samples == [] and load.summary() == {} and load_text(load.summary()) == ""


def test_the_load_in_words_says_when_the_machine_had_more_work_than_cpus():
    assert load_text({"load_1min_min": 0.9, "load_1min_max": 1.4, "cpus": 2}) == "load average 0.90-1.40 on 2 CPUs"
    assert load_text({"load_1min_min": 1.0, "load_1min_max": 1.0, "cpus": 4}) == "load average 1.00 on 4 CPUs"
    assert load_text({"load_1min_min": 1.5, "load_1min_max": 3.1, "cpus": 2}) == \
        "load average 1.50-3.10 on 2 CPUs (more work than CPUs)"
