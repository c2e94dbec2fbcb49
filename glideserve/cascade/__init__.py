"""Model cascades (DiffServe): a light model answers, a discriminator decides whether the heavy
model must; an allocation MILP sizes both to demand, live on one machine or simulated on many.

Nothing is imported here: the command line reads ``POLICIES`` at start-up, and the allocator needs
scipy, which only the ``serve`` and ``bench`` extras install.
"""

# The policies a cascade can be run under, in the simulator and the benchmark alike: the MILP
# (threshold and capacity re-planned), static (threshold fixed, capacity re-planned), all-light
# (nothing escalated), all-heavy (no light pass).
POLICIES = ("milp", "static", "all-light", "all-heavy")
