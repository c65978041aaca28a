"""The benchmark of adapt against HF PEFT (``tools/bench/bench.py`` is its command line).

* :mod:`.config`: case, method and library names, sizes, goals;
* :mod:`.timing`: the harness (alternating pairs, warm-up, clocks; the seeded model and batch);
* :mod:`.workloads`: the same work on each side (configs, injection, training step, floor);
* :mod:`.cases`: the timed cases (import, inject, train, infer, merge, load, allocate);
* :mod:`.overhead`: the adapter's own training cost (step − floor) per shape and precision;
* :mod:`.mixed`: the mixed-batch case (one adapter per sample; its table and curve);
* :mod:`.memory`: the peak-memory case and its worker process;
* :mod:`.report`: rows, ratios against the goals, the table and the environment record.
"""
