"""sbfast benchmarks: every fast face of every op against the plain-PyTorch reference.

``python -m bench`` prints one table and writes ``bench/results/<device>.json``;
``python -m pytest bench`` runs the same cases under pytest-benchmark.
"""
