"""Shard links: each shard's network link carries one transfer at a time per direction.

The simulated clusters (Downpour's :mod:`.cluster`, Sandblaster's
:mod:`.sandblaster_cluster`) share this model, switched on by ``Costs.shard_links``::

    replica a   |lat|==a's bytes==|                      OUT: pulls (shard -> replica)
    replica b   |lat|.............|==b's bytes==|        IN:  pushes (replica -> shard)
                     ^ b waits for the link: FIFO turns, one transfer at a time

A transfer costs ``latency + nbytes / bandwidth``; the latency (software and wire
delay) does not hold the link, the bytes do.  FIFO turns give the same throughput as
sharing the bandwidth among the transfers at once: R replicas moving ``b`` bytes
through one shard's link take ``R * b / bandwidth`` in all.  Not modelled: the
network's core (any two links talk at full speed) and the replicas' own links (a
replica's transfers are sequential anyway).
"""

from __future__ import annotations

import simpy

OUT, IN = 0, 1  # a link's directions: pulls out of the shard, pushes into it


class ShardLinks:
    """The links of ``shards`` shards on ``env``, at ``costs.latency`` and
    ``costs.bandwidth`` (a :class:`~.cluster.Costs`)."""

    def __init__(self, env: simpy.Environment, shards: int, costs):
        self.env, self.costs = env, costs
        self.links = [(simpy.Resource(env, 1), simpy.Resource(env, 1))
                      for _ in range(shards)]

    def send(self, shard: int, way: int, nbytes: int):
        """``nbytes`` into (``way`` IN) or out of (OUT) ``shard``: the latency, then the
        bytes once that direction of the shard's link is free (a SimPy process body)."""
        c = self.costs
        yield self.env.timeout(c.latency)
        with self.links[shard][way].request() as turn:
            yield turn
            yield self.env.timeout(nbytes / c.bandwidth)
