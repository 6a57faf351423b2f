"""How a job runs over processes and nodes: the Engine (strategy, collectives), the strategy-independent training
state, the launcher's environment (torchrun, Slurm) and preemption (signals, requeue)."""
