"""Simulation: carrying the experiments past the cores of this machine, honestly.

Two tools, each calibrated from measured runs and checked against them:

- Virtual-time cluster simulation (Figures 4 and 5): the real replicas, shard states and
  kernels, only the clock simulated.  :mod:`.cluster` (the discrete-event model),
  :mod:`.calibrate` (the measured costs it is driven by), :mod:`.run` and :mod:`.cli`
  (``mpibelief simulate``), :mod:`.validate` (simulated against real runs);
  :mod:`.sync` (synchronous SGD, Strom-compressed or not, and SGD [1]) with
  :mod:`.collectives` (MPICH's allreduce and allgather costs) and :mod:`.exchange_work`
  (the exchange's arithmetic); :mod:`.partitioned` (a replica of P partitions: its step
  from the scaling model, its transfers per partition); :mod:`.sandblaster` and
  :mod:`.sandblaster_cluster` (Sandblaster L-BFGS: the real driver and dispatcher on the
  same clock).
- Model-parallel scaling (Figure 3): :mod:`.steptime` (one replica's forward plus
  backward timed under ``mpiexec -n P``), :mod:`.pingpong` (this machine's MPI latency
  and bandwidth), :mod:`.network` (a network description and the era presets),
  :mod:`.compute` (one partition's per-layer compute, timed alone on one core) and
  :mod:`.scaling` (time per mini-batch for any ``P`` from those).
"""
