"""``glmport bench``: how fast and how lean glmport's own training step is, side by side with the reference recipe.

* :mod:`.shapes`: model shapes (ChatGLM3-6B, GLM-4-9B, the CPU-sized ``mini``, or a config.json) and the
  seeded random-weight model folders built for them;
* :mod:`.workloads`: the synthetic workloads W1/W2/W3 of the performance notes;
* :mod:`.flops`: model FLOPs per step (the MFU numerator) and the device's matmul ceiling, measured;
* :mod:`.recipes`: the reference recipe and each of glmport's optimizations, one knob at a time;
* :mod:`.runner`: one recipe on one backend, timed through glmport's real training step;
* :mod:`.estimate`: peak memory predicted without allocating anything.
"""
