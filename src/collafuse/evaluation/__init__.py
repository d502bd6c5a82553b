"""Everything measured about a run: sample quality, memorisation, what the server could learn, the formal privacy of
the upload, compute and communication cost, and the run's own report. Runs over many configurations and their
summaries live in ``collafuse.study``.

Modules: ``features`` (feature extractors: the domain classifier, Inception), ``fidelity`` (FID / KID),
``disclosure`` (attacks on what the server holds), ``accounting`` (the upload's (epsilon, delta)), ``compute``
(FLOPs, wall time, energy), ``communication`` (bytes per client from the message log), ``evaluate`` (``collafuse
evaluate``: all of the above for one run), ``experiment`` (``collafuse run``: train, sample, report), ``report``
(a run's report files), ``memorisation`` (does a model copy its training images). It imports ``collafuse.config``, ``collafuse.data`` and
``collafuse.split``, never ``collafuse.flower``.
"""
