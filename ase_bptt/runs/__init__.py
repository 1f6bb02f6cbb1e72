"""Training runs: the machinery pretraining and BPTT fine-tuning share.

A run's skeleton (``run``: join the process group, load the splits, identify the run, start or resume, train,
export), its resumable loop (``loop``: batch order, schedule, SIGINT, evaluation cadence), the decision to start,
resume or do nothing (``resume``), the state files (``state``), the configs' base, JSON and hashes (``config``),
the torch.distributed helpers (``distributed``) and the errors of a run (``common``). What is trained lives in
ase_bptt.train, which plugs into this.
"""
