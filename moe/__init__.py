"""MoE model code: experts, routing policies, competition schedule, the Transformer LM. Knows nothing of parallelism."""
