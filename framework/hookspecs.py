"""The extension points of layerprobe: one hook per kind of plugin.

A plugin module implements any of these with ``@hookimpl`` and calls ``register`` once per thing it
adds. Built-ins (``plugins/``) register through the same hooks as third-party packages, which are
found through the entry-point group ``layerprobe``. Each registered name becomes an option of the
Hydra config group of the same kind (``encoder=…``, ``pooler=…``, ``dataset=…``), with the fields
of its ``schema`` dataclass as its options — no YAML needs to be shipped.
"""

import pluggy

hookspec = pluggy.HookspecMarker("layerprobe")
hookimpl = pluggy.HookimplMarker("layerprobe")


@hookspec
def register_encoders(register):
    """Add encoders: ``register(name, factory, schema)``.

    Called once when the plugin manager starts. ``schema`` is a dataclass of the encoder's options
    (defaults included); ``factory(options)`` gets a filled-in ``schema`` instance and returns an
    object with ``resolve_layer(layer) -> Layer``, ``fingerprint() -> str`` and
    ``encode(sentences, layer) -> Iterator[TokenStates]`` (see ``framework.stages.Encoder``).
    Factories must be cheap: load weights on first ``encode``. An encoder whose states are cheaper
    to recompute than to cache sets ``cache_token_states = False``.
    """


@hookspec
def register_poolers(register):
    """Add poolers: ``register(name, factory, schema)``.

    ``factory(options)`` returns an object with ``pool(TokenStates) -> Tensor[batch, dim]``
    and, for poolers that learn, ``fit(PairTokenStates, seed) -> dict`` (its training curve), which the
    harness calls with the train split only, before any evaluation split is encoded.
    """


@hookspec
def register_datasets(register):
    """Add datasets of sentence pairs: ``register(name, factory, schema)``.

    ``factory(options)`` returns an object with ``splits`` (names it can load) and
    ``load(split, limit) -> PairSet`` that accounts for every row it read.
    """


@hookspec
def register_metrics(register):
    """Add metrics: ``register(name, function, calibrated=False)``.

    ``function(scores, labels) -> float`` scores one split; the harness adds a bootstrap CI.
    With ``calibrated=True`` it is ``function(scores, labels, threshold)``: the harness picks the
    threshold that maximises it on the calibration (train) split and applies it to the evaluated
    split.
    """
