"""The benchmark suite, shipped with the package so `python -m sparsekern bench` runs from
any install (the repository's bench/ folder holds scripts that import from here, and the
stored results).

  run.py      the suite: kernels, models, masks, quality; rows to CSV/JSON, summary, plots
  cases.py    real model shapes, providers (sparsekern and its peers), checks, timing loops
  common.py   environment record (versions, commit, device), quantiles, JSON rows
  plots.py    summary tables and plots from stored rows (`python -m sparsekern.bench.plots`)
  quality.py  one-shot pruning quality (MiniLM embeddings, digits accuracy)
  overhead.py per-call cost of the ops door and a sparse module (`python -m sparsekern.bench.overhead`)

The app layer: it uses the whole library, and nothing in the library imports it.
"""
