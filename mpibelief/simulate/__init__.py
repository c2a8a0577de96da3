"""Virtual-time simulation: the real algorithms at scales this machine cannot run.

The replicas, shard states and kernels are the real ones; only the clock is simulated.
See :mod:`mpibelief.simulate.cluster` (the discrete-event model),
:mod:`mpibelief.simulate.calibrate` (the measured costs it is driven by) and
:mod:`mpibelief.simulate.validate` (simulated against real runs on this machine).
"""
