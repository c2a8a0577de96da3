"""The parameter server: one-sided windows, shard state and loop, clients, setup.

- :mod:`~mpibelief.ps.window`: one class per RMA window (protocols in the docstrings);
- :mod:`~mpibelief.ps.shard`: a shard's plain-numpy state and its MPI serve loop;
- :mod:`~mpibelief.ps.client`: pull, push and load over a range of the flat vector;
- :mod:`~mpibelief.ps.memory`: the same client interface over shard states, no MPI;
- :mod:`~mpibelief.ps.server`: building it all over a communicator.

Only :mod:`~mpibelief.ps.memory` and :mod:`~mpibelief.ps.shard`'s state import without
MPI being needed at run time; import the submodules you use.
"""
