"""PrisMesh: federated LoRA fine-tuning of LLMs across institutions, coordinated by EVM contracts
with HotStuff-style BFT finality.

The house and its wings: ``prismesh.chain`` (EVM clients and deployment, finality, storage,
identities, the task spec), ``prismesh.node`` (a hospital's trainer, evaluator and daemon),
``prismesh.aggregator`` (verification, aggregation strategies, the aggregator daemon, the audit),
``prismesh.runs`` (whole-system runs: the in-process federation, demo, experiment) and
``prismesh.cli`` (the ``prismesh`` command).
"""

__version__ = "0.2.0"
