"""Model-parallel timing (Figure 3): measured steps, the network, and the scaling model.

- :mod:`.steptime`: one replica's forward plus backward, timed under ``mpiexec -n P``
  (what ``bench/model_parallel.py`` measures on this machine);
- :mod:`.pingpong`: this machine's MPI latency and bandwidth;
- :mod:`.network`: a network description (latency, bandwidth) and the era presets;
- :mod:`.compute`: one partition's per-layer compute, timed alone on one core;
- :mod:`.scaling`: time per mini-batch for any ``P`` from those three.
"""
