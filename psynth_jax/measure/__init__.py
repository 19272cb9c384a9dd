"""Measuring the method: time, time to first token, the roofline cost model, XLA op profiles.

- timing.py: `time_calls`, the one timer (a compile call, then timed calls each waited for);
- ttft.py: the TTFT of a synthesis path, timed around `ParallelSynthesis`'s steps (demo, eval);
- roofline.py: a device's `Roofline` and the cost model that gives each path its floor;
- profile.py: self time per XLA op of a jitted call, from a profiler trace.

The demo and the evaluation time through it; the benchmarks (benchmarks/, outside the package)
measure and report through it too.
"""
