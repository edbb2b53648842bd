"""Distributed screening of cathode candidates on Ray Data (see :mod:`.pipeline`).

Read a screen's output in a notebook with :func:`cathode_ray.screen.runs.read_results` and
:func:`~cathode_ray.screen.runs.read_rejects` (``read_results("out/screen").to_pandas()``).
"""
