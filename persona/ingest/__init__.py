"""The one ingestion path: validated events in, session state, event log and prototype bank out.

The Kafka consumer and ``POST /v1/events`` both call :meth:`Ingestor.apply`, so an event has the same
effect whichever way it arrives. This module knows the store and the model, nothing of Kafka, HTTP or
Prometheus: it returns an :class:`IngestResult` and each caller turns it into its own metrics.

Semantics of one ``apply`` (one store transaction; all or nothing):

1. Dedup: every event is logged by ``event_id``; an id already in the log, or repeated earlier in the same
   batch, is a duplicate: counted, never applied. This is what turns Kafka's at-least-once delivery into
   an exactly-once effect (offsets are committed only after this transaction).
2. Unknown items (not in the model's vocabulary): policy ``"skip"`` logs them (``known_item=False``) and
   counts them on the session without touching its model state; ``"dlq"`` neither logs nor applies them
   and hands them back as rejections for the caller's dead-letter queue.
3. For each applied event, in batch order (per session: arrival order), *before* applying it: the
   prequential check ranks its item with the session's previous history under the Persona edit of the
   previous state and under the base model (a session's first event has no history: no prediction).
4. Then the item is appended to the recent items; codes of every event's post-event history come from
   ONE batched forward; each code is assigned to the nearest centre of the bank as it was when the
   batch started, and the bank is refined with the codes in event order (streaming k-means).
5. The batch's prequential counts (predictions, hits and NDCG gain at each K, reciprocal rank, per variant) are
   added to the store's ``online_counters`` in the same transaction, so the online hit rate is exactly-once like
   the session state; the exported metrics are read from there.

So the result depends on the events and on the batch boundaries only through the bank snapshot used for
assignments inside a batch; with batches of one event it is exactly the sequential algorithm.

Where each step lives (data flows down this list; nothing here knows Kafka, HTTP or Prometheus):

- :mod:`~persona.ingest.ingestor`: :class:`Ingestor`, the orchestration: ``prepare`` (read the touched sessions,
  walk the events, start the model work) and ``commit`` (the transaction: lock the bank, check what prepare read,
  dedup, score, conclude, refine the bank, write sessions and counters).
- :mod:`~persona.ingest.plan`: :func:`walk`, what a batch does to its sessions before any model work.
- :mod:`~persona.ingest.previous`: the stored states that score each session's first event of the batch.
- :mod:`~persona.ingest.work`: the model work's inputs and the futures while it runs.
- :mod:`~persona.ingest.model_work`: the model work itself, as plain tensors in and out (the same code runs here or
  in the model process of :mod:`~persona.ingest.model_worker`).
- :mod:`~persona.ingest.result`: :class:`IngestResult` and the prequential counters, filled by :func:`conclude`.
- :mod:`persona.bank_rows` (shared with the API): the prototype bank between store rows and tensors.

The model's own arithmetic (codes, edits, prototypes, group counts) is :class:`recsys.online.OnlineModel`'s.
"""

from persona.ingest.ingestor import UNKNOWN_ITEM_POLICIES, Ingestor, ModelSource, Prepared
from persona.ingest.result import KS, VARIANTS, IngestResult, ndcg_gain, online_counter_increments

__all__ = [
    "KS",
    "UNKNOWN_ITEM_POLICIES",
    "VARIANTS",
    "IngestResult",
    "Ingestor",
    "ModelSource",
    "Prepared",
    "ndcg_gain",
    "online_counter_increments",
]
