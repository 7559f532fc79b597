"""The extension points of layerprobe: one hook per kind of plugin.

A plugin module implements any of these with ``@hookimpl`` and calls ``register`` once per thing it
adds. Built-ins (``plugins/``) register through the same hooks as third-party packages, which are
found through the entry-point group ``layerprobe``. Each registered name becomes an option of the
Hydra config group of its kind (``encoder=…``, ``pooler=…``, ``dataset=…``, ``tracking=…``), with
the fields of its ``schema`` dataclass as its options — no YAML needs to be shipped. What the
objects a factory returns must provide (and may provide) is in ``framework.stages``.
"""

import pluggy

hookspec = pluggy.HookspecMarker("layerprobe")
hookimpl = pluggy.HookimplMarker("layerprobe")


# --- What a job evaluates -----------------------------------------------------------------------

@hookspec
def register_encoders(register):
    """Add encoders: ``register(name, factory, schema)``.

    Called once when the plugin manager starts. ``schema`` is a dataclass of the encoder's options
    (defaults included); ``factory(options)`` gets a filled-in ``schema`` instance and returns a
    ``framework.stages.Encoder``. Factories must be cheap: load weights on first ``encode``.
    Optional members: ``cache_token_states = False`` for encoders whose states are cheaper to
    recompute than to cache; ``can_resume_from``/``resume`` for encoders that can continue from a
    shallower layer's cached states (``framework.stages.ResumableEncoder``).
    """


@hookspec
def register_poolers(register):
    """Add poolers: ``register(name, factory, schema)``.

    ``factory(options)`` returns a ``framework.stages.Pooler``: ``pool(TokenStates) -> Tensor[batch,
    dim]``. Poolers that learn also have ``fit(PairTokenStates, seed) -> dict`` (their training
    curve), which the harness calls with the train split only, before any evaluation split is
    encoded, and may have ``learned() -> dict`` (tensors saved with the run).
    """


@hookspec
def register_postprocessors(register):
    """Add post-processors of pooled vectors: ``register(name, factory, schema)``; ``postprocess=<name>``.

    ``factory(options)`` returns a ``framework.stages.PostProcessor``: ``fit(train_vectors, seed)``
    learns statistics from the pooled vectors of the train split's distinct sentences (the
    evaluated split is never seen while fitting) and returns what to log as the run's artifact
    (name → tensor); ``transform(vectors) -> vectors`` is then applied to both sentences of every
    evaluated pair, before the cosine. ``needs_fit = False`` for one that learns nothing.
    """


@hookspec
def register_datasets(register):
    """Add datasets of sentence pairs: ``register(name, factory, schema)``.

    ``factory(options)`` returns a ``framework.stages.Dataset``: ``splits`` (the names it can load)
    and ``load(split, limit) -> PairSet``, which accounts for every row it read and says whether
    its labels are ``binary`` or ``graded`` (``PairSet.label_kind``). ``split`` and
    ``limit`` are options the harness owns for every dataset (``dataset.split``, default
    ``validation``; ``dataset.limit``, default null = all rows): a schema need not declare them,
    and the harness passes them to ``load``.
    """


@hookspec
def register_metrics(register):
    """Add metrics: ``register(name, function, calibrated=False, inputs="scores", labels="any")``.

    ``inputs="scores"``: ``function(scores, labels) -> float`` scores one split's pairs; the
    harness adds a bootstrap CI. With ``calibrated=True`` it is ``function(scores, labels,
    threshold)``: the harness picks the threshold that maximises it on the calibration (train)
    split and applies it to the evaluated split. ``labels="binary"``: the metric means something
    only for 0/1 labels, and is left out (with a note) on graded data such as STS-B.
    ``inputs="vectors"``: ``function(vectors: framework.data.SentenceVectors, seed) -> float``
    looks at the embedding space itself (the evaluated split's distinct sentences, as the cosine
    sees them), e.g. anisotropy; no CI. Every metric named in ``metric.names`` shows in summaries,
    plots and reports.

    Optional, for speed (the bootstrap evaluates a metric on 1,000 resamples): ``batched=prepare``
    where ``prepare(scores, labels)`` returns ``f(counts) -> array[rows]``, the metric of every
    resample at once (``counts[r, i]``: how often resample r drew pair i; ``framework.bootstrap``
    has sorted-once tie groups and rank and linear correlations); a calibrated metric may give
    ``confusion=f(tp, fp, fn, tn) -> array`` instead, used for the threshold search and the
    resamples. Without them the scalar function is called once per resample (same numbers, slower).
    """


@hookspec
def register_finetuners(register):
    """Add fine-tuning methods: ``register(name, factory, schema)``; ``finetune=<name>``.

    ``factory(options)`` returns a ``framework.stages.Finetuner``. The harness gives it the pairs
    of ``finetune.train_split`` (never the evaluated split) and an encoder's model (any encoder that
    is a ``framework.stages.TunableEncoder``); the tuned weights are stored by fingerprint (base
    model, options, seed, the training pairs), so a sweep over layers and poolers tunes once, and
    the job evaluates the encoder rebuilt on them. ``train_split``, ``train_limit`` and ``dir``
    are options the harness owns for every finetuner.
    """


# --- Where results go ---------------------------------------------------------------------------

@hookspec
def register_trackers(register):
    """Add trackers: ``register(name, factory, schema)``; ``tracking=<name>`` picks one.

    ``factory(options)`` returns a ``framework.stages.Tracker``. The harness calls, in the sweep's
    driver process, ``start_sweep(sweep)`` before any job (what it returns is stored in the sweep
    directory for every worker) and ``end_sweep(sweep, results, files, status)`` after the last
    (or on interruption); in whatever process runs a job, ``start_job(job)`` before the work and
    ``end_job(job, result, evaluation)`` after it, also when it failed or was interrupted.
    Optional: ``find_finished(config_hash)`` (for ``resume=true``), ``recover_stale()`` (runs left
    RUNNING by killed processes), ``load_results(parent)`` (for ``python -m framework.report``).
    """
