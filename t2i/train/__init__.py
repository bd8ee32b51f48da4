"""Training components the loop in pipelines/train.py calls: the DeepSpeed engine and LR schedule
(`engine`), the loss of a micro-batch (`step`), checkpoint policy and resume (`checkpointer`), the
run folder (`run`), preemption (`preemption`), diagnostics, logging, timing, in-training
evaluation (`live_eval`) and the test suite's fault hooks (`faults`)."""
