"""Model cascades (DiffServe): a light model answers, a discriminator decides whether the heavy
model must; an allocation MILP sizes both to demand, live on one machine or simulated on many."""
