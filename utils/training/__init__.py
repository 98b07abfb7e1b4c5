"""Training stage: the trainer and its epoch engine, loss and assigner, optimiser, EMA and distributed helpers."""
