"""Several processes for one ``glmport train``: one node or many, through torchrun's launcher.

``glmport train CONFIG --nproc-per-node N [--nnodes M --node-rank R --master-addr A --master-port P]
[--devices 0,1] [--dry-run]`` does not run its own process pool. It works out a launch (:mod:`.plan`):
which backend, which devices, which collective, the environment each process needs, a free port; and then
hands it to ``torch.distributed.run`` (:mod:`.agent`), whose elastic agent starts the processes, watches
them, and stops the others when one fails. ``--dry-run`` prints the plan, the exact command and
environment for each node, and exits.

Each process runs ``python -m glmport train ...`` again, without the launch flags; it finds its rank in
the variables the agent sets, so a user who starts ``torchrun ... -m glmport train ...`` or the DeepSpeed
launcher gets the same run (:mod:`glmport.train.ranks` is the worker side). A process that fails leaves
its error where the agent reads it (:mod:`.worker`), and the launcher reports the rank, the error and the
last lines of its log.

No device names here: the backend says what its visible-devices variable and its collective are.
"""
