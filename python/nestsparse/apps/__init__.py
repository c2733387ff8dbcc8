"""Applications built on the nestsparse library, apart from its core: the demo, the ``qos`` command and its load
scenarios, the model zoo, the datasets that need no download and the training tasks on them. The core
(nestsparse.formats, ops, nn, convert, io, pruning, runtime) never imports from here."""
