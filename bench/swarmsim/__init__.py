"""Discrete-event simulation of the swarm's control plane (``bench/swarm_sim.py``).

``nodes``: devices, latencies, signed record sizes; ``dht``: Kademlia lookups and the
capability-record store whose bytes are counted; ``view``: a client's pre-selected
candidates and the newcomer rule; ``requests``: requests driven through the real
``StarStrategy``/``Router``/``DeadlineTracker`` over simulated links; ``world``: the
event loop, churn and the numbers it reports.
"""
