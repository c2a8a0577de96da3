"""mpibelief: DistBelief (Dean et al., NIPS 2012) rebuilt on MPI one-sided windows."""

__version__ = "0.1.0"
