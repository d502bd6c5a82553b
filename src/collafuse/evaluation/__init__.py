"""Everything measured about a run, and the runs made to measure it: sample quality, what the server could learn,
the formal privacy of the upload, compute and communication cost, and the reports, sweeps and summaries over seeds.

Modules: ``features`` (feature extractors: the domain classifier, Inception), ``fidelity`` (FID / KID),
``disclosure`` (attacks on what the server holds), ``accounting`` (the upload's (epsilon, delta)), ``compute``
(FLOPs, wall time, energy), ``communication`` (bytes per client from the message log), ``evaluate`` (``collafuse
evaluate``: all of the above for one run), ``experiment`` (``collafuse run``: train, sample, report), ``report``
(a run's report files), ``sweep`` and ``sweep_report`` (runs over cuts and seeds, and their report),
``seed_summary`` (intervals and verdicts over seeds). It imports ``collafuse.config``, ``collafuse.data`` and
``collafuse.split``, never ``collafuse.flower``.
"""
