"""CollaFuse over Flower (flwr 1.41, Message API): a transport adapter over the same Client and Server roles.

- ``codec``: a protocol ``Message`` <-> a Flower ``RecordDict`` (the shared task module);
- ``transport``: ``FlowerTransport``, the server side's ``Transport`` over a Flower ``Grid``;
- ``server_app``: the ServerApp, which runs ``split.runner.Orchestrator`` (the same round loop as in process);
- ``client_app``: the ClientApp, a ``Client`` role whose state lives in its node's own directory;
- ``launch``: starting SuperLink/SuperNodes for simulation and for the TLS + authentication loopback demo.

Importing ``collafuse`` never imports flwr; only this subpackage does. It imports ``collafuse.config``,
``collafuse.data`` and ``collafuse.split``, never ``collafuse.evaluation``.
"""
