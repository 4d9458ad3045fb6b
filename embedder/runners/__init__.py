"""Runners drive the flow connector → chunk → pack → encode → sink → checkpoint.

``local`` runs it in one process (reader/tokenizer worker processes feeding one encoder); ``ray``
runs the same stage functions (``embedder.runners.stages``) on Ray Data, CPU stages as tasks and one
encoder actor per GPU (see docs/ray.md). ``RayRunner`` extends ``LocalRunner``: the run skeleton
(lease, generations, commits, canaries, drain) is written once.
"""
