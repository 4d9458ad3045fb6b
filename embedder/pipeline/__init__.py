"""The stages of the flow, in pipeline order, shared by every scheduler (local threads and processes,
Ray tasks and actors):

1. ``read``    — list a source's shards, read one into blocks of chunks closed by its ``ShardEnd``
2. ``chunk``   — the chunker a worker rebuilds from the model's serialized tokenizer
3. ``change``  — incremental passes: drop unchanged chunks, close each shard with its change record
4. pack        — ``embedder.packing.TokenBudgetPacker``: length buckets, token-budget batches
5. ``encode``  — the one loop that keeps two batches in flight on the device
6. ``commit``  — encoded chunks back into shards: sink commit, quarantine, completion record

Each module has one contract and no knowledge of where it runs; the run skeleton
(``embedder.execution.skeleton``) and the schedulers (``embedder.runners``) put them together.
"""
