"""The split protocol's core: the diffusion chain cut between one server and its clients, the two roles, the messages
between them and how they travel, the round loop, checkpoints and secrets.

Modules: ``diffusion`` (schedules, the cut, samplers), ``models`` (the UNets and label encoders), ``learner`` (one
node's optimizer, EMA and training step), ``protocol`` (message kinds and their checks), ``client`` and ``server``
(the two roles), ``upload`` (clipping a client's images before they leave it), ``fedavg`` (the federated-averaging
baseline's math), ``transport`` (delivery and the message log), ``runner`` (the orchestrator and an in-process
federation), ``checkpoint`` (atomic per-round checkpoints), ``seeding`` (client secrets and derived seeds).
It imports only ``collafuse.config`` and ``collafuse.data`` from outside itself.
"""
