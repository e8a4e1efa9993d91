"""Planning before a run: memory per device (and, beside it, cost) from the same configs the stages train with."""
