"""profiler_steps / profiler_steps_start: a Chrome trace of those optimizer steps in the train
artifact."""

from __future__ import annotations

import json


def test_profiler_traces_the_chosen_steps(warm, molt, cache_dir, workdir):
    result = molt("train", warm(max_steps=4, profiler_steps=2, profiler_steps_start=1))
    assert result.exit_code == 0, result
    assert "not supported yet" not in result.output, result.output
    train = max(cache_dir.glob("train/*/metrics.json"), key=lambda p: p.stat().st_mtime).parent
    trace = json.loads((train / "profiler_trace.json").read_text())
    events = trace["traceEvents"]
    steps = sorted({e["name"] for e in events if e.get("name", "").startswith("ProfilerStep#")})
    assert len(steps) == 2, steps  # one span per profiled optimizer step
    assert all({"ph", "ts", "pid"} <= e.keys() for e in events if e.get("ph") == "X")
    names = {e.get("name", "") for e in events}
    assert any(n.startswith("aten::") for n in names)  # the ops the steps ran
    assert any(e.get("name") == "[memory]" for e in events)  # profile_memory: allocations recorded
    assert (workdir / "out" / "profiler_trace.json").read_bytes() == (train / "profiler_trace.json").read_bytes()  # and in output_dir
