"""Experiment tooling around the measurement: the ``lightning-gns`` console script and what it runs.

- :mod:`~lightning_gns.tools.report`: summarize and plot the ``gns/`` scalars of TensorBoard runs.
- :mod:`~lightning_gns.tools.critical_batch`: fit the steps/examples trade-off ``S = S_min + E_min / B``.
- :mod:`~lightning_gns.tools.sweep`: batch-size sweeps and branched training on Lightning, beside ``B_simple``.
- :mod:`~lightning_gns.tools.cli`: the console script (``report``, ``sweep``, ``branch``).

Nothing in the measurement chain (``lightning_gns`` itself) imports these modules.
"""
