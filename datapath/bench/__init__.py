"""``hostrouting bench``: legacy routing vs eBPF host routing vs the lab's limit.

The same netperf tests run through a legacy lab, an eBPF lab, the lab's
limit (a path with neither) and the floor (the redirect alone), back to back
in every repetition; the medians of each mode and the paired ratios, with
their confidence intervals, are the result (docs/benchmarks.md).

- ``runner``: the labs (one per mode), the netservers and the sampling loop
  (``run_bench``);
- ``floor``: the mechanism floor, a constant redirect on eBPF host routing's
  hooks (bpf_c/redirect_floor.c);
- ``netperf``: netperf and netserver inside lab namespaces, and their output
  parsed into numbers;
- ``report``: samples into medians and ratios, tables, JSON, ``bench compare``
  and a plot;
- ``perf``: ``bench --profile``, perf record around an extra repetition and
  the top kernel symbols of what it recorded.
"""
