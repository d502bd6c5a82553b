"""Images in, client datasets out: the image sources (one module per on-disk format), uint8 <-> model-range
conversion and grids, and the partition of a dataset across clients.

Modules: ``common`` (``ImageSet``, ``Splits``, ``DataError``, reading and fitting one image, the holdout split),
``idx`` (IDX files, Fashion-MNIST), ``image_folder``, ``cifar10``, ``celeba``, ``sklearn_digits``, ``lfw_subset``
(the six source formats), ``sources`` (``load_source``, the dispatcher over them), ``images`` (``to_uint8``,
``to_model_range``, image grids), ``partition`` (partition rules, ``ClientData``, per-client datasets, export as
per-client IDX folders). It imports only ``collafuse.config`` from outside itself.
"""
