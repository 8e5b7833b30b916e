"""Drop-ins for the trainers people run, with their own argument names and reductions:
kdkernels.integrations.trl (TRL 1.16's DistillationTrainer, GKDTrainer and
ServerDistillationTrainer losses). Each module imports its trainer package lazily, only when
a switch function asks for it: the loss functions themselves need only torch."""
