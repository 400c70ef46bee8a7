"""``glmport train``: :mod:`glmport.train.recipe` is the run, top to bottom; the other modules are its steps.

* ``state``: the request and the run's state (what plugins see); ``outputs``: the output folder's names;
* ``lock``, ``rundir``, ``faults``: one run per output folder, its room and its own record, write faults;
* ``inputs``, ``environment``, ``resume``: checks before anything is loaded, and the run's environment;
* ``ranks``, ``signals``: the processes of a multi-process run and how they agree (inputs, decisions, the
  step to stop at); a single process is one rank;
* ``arguments``, ``loading``, ``dataset``, ``methods``: training arguments, model, data, LoRA / P-Tuning / SFT;
* ``trainer``, ``loss``, ``guarded``, ``callbacks``, ``metrics``: the Trainer and what it runs each step;
* ``publish``, ``summary``, ``plot``: the result folder, predictions, summary and loss curve.

The modules that import torch at their top load only when a run (or ``glmport infer``) needs them: the
recipe imports them after its input checks.
"""
