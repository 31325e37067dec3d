"""The pipeline's stages, one module each: ``data``, ``preprocess``, ``train``, ``evaluate`` (the DVC stages)
and ``predict`` (:mod:`.shard`: which cases a ``--shard K/N`` run takes). Each ``run(cfg, ...)`` reads the
stage's inputs, calls the library, writes its outputs (atomically) and tracks the run; the CLI
(:mod:`pipeline.cli`) calls only these. Nothing in the library imports a stage: data flows
config/spacing -> contracts -> io -> model/losses -> preprocessing/data -> evaluation -> inference ->
training -> tracking/dvc_metrics -> inspection -> stages -> cli (tests/architecture checks it).
"""
