"""``hostrouting bench``: legacy routing vs eBPF host routing vs the lab's limit.

The same netperf tests run through a legacy lab, an eBPF lab and the lab's
limit (a path with neither), interleaved; the medians of each mode and their
ratios are the result (docs/benchmarks.md).

- ``runner``: the labs, the netservers and the sampling loop (``run_bench``);
- ``netperf``: netperf and netserver inside lab namespaces, and their output
  parsed into numbers;
- ``report``: samples into medians and ratios, tables, JSON, ``bench compare``
  and a plot.
"""
