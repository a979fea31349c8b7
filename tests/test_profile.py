import json
import threading
import time

from qlora_ext.profile import PROFILER, Profiler, _intersection_length, _intervals


def test_disabled_profiler_records_nothing():
    p = Profiler()
    with p.phase("attention"):
        pass
    p.record("ffn", "gpu", 0.0, 1.0)
    assert p.spans == []


def test_phase_table_overlap_and_trace(tmp_path):
    p = Profiler()
    p.start(adapter="test")
    with p.step():
        base = time.perf_counter()
        with p.phase("attention"):
            time.sleep(0.02)
        # a GPU span that overlaps the CPU phase by 10 ms and then runs 10 ms alone
        p.record("ffn", "gpu", base + 0.01, base + 0.03)
        time.sleep(0.015)
    p.stop()
    s = p.summary()
    names = {(ph["phase"], ph["device"]) for ph in s["phases"]}
    assert names == {("attention", "cpu"), ("ffn", "gpu")}
    t = s["totals"]
    cpu = next(sp for sp in p.spans if sp.name == "attention")
    expected = min(cpu.end, base + 0.03) - max(cpu.start, base + 0.01)  # sleep may overshoot
    assert abs(t["overlap_ms"] - 1e3 * expected) < 1e-6 and expected >= 0.009
    assert t["step_ms"] >= 30
    assert "attention" in p.table() and "overlap" in p.table()
    path = tmp_path / "trace.json"
    p.write_trace(path)
    trace = json.loads(path.read_text())
    tracks = {e["args"]["name"] for e in trace["traceEvents"] if e["ph"] == "M" and e["name"] == "thread_name"}
    assert "GPU queue" in tracks and any(n.startswith("CPU thread") for n in tracks)
    assert any(e.get("name") == "ffn" and e["tid"] == 1000 for e in trace["traceEvents"])


def test_threads_get_their_own_tracks():
    p = Profiler()
    p.start()
    # all three alive at once: a finished thread's ident may be reused by the next one
    together = threading.Barrier(3)

    def work():
        with p.phase("rope"):
            together.wait()

    ts = [threading.Thread(target=work) for _ in range(3)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    p.stop()
    cpu_tracks = {e["tid"] for e in p.chrome_trace()["traceEvents"] if e["ph"] == "X" and e["cat"] == "cpu"}
    assert len(cpu_tracks) == 3


def test_interval_helpers():
    assert _intervals([(3, 4), (0, 2), (1, 3)]) == [[0, 4]]
    assert _intersection_length([[0, 2], [5, 7]], [[1, 6]]) == 2


def test_overhead_when_off_is_small():
    """The off path must cost far less than the 2% budget of even a 1 ms phase."""
    assert not PROFILER.enabled
    n = 100000
    t0 = time.perf_counter()
    for _ in range(n):
        with PROFILER.phase("x"):
            pass
    per_call = (time.perf_counter() - t0) / n
    assert per_call < 2e-6


def test_phase_timer_nests_per_thread():
    """Two threads' phases overlap (the split placement's lanes and its CPU worker): each
    thread's phase keeps its own time.  A 'a' opens, B 'b' opens, A closes, B sleeps and closes:
    'b' holds the sleep, 'a' almost nothing."""
    from qlora_ext.profile import PhaseTimer

    timer = PhaseTimer()
    b_open, a_closed = threading.Event(), threading.Event()

    def thread_a():
        with timer("a"):
            b_open.wait()
        a_closed.set()

    def thread_b():
        with timer("b"):
            b_open.set()
            a_closed.wait()
            time.sleep(0.05)

    ts = [threading.Thread(target=thread_a), threading.Thread(target=thread_b)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    times = timer.reset()
    assert times["b"] >= 0.05 and times["a"] < 0.04
