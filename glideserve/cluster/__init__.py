"""Scale-out on Ray Serve (the ``cluster`` extra): replicas of the engine behind the same OpenAI API.

Layout: ``config`` (the validated cluster.yaml, no Ray), ``backend`` (the server Backend that routes
requests to replicas and retries them when one dies, no Ray), ``registry`` (the replicas' reported
load and steps), ``router`` (deadline-aware replica choice), ``deployments`` and ``runtime`` (Ray
Serve). Only the last four import Ray; nothing in the single-machine path imports this package.
"""
