"""Runners drive the flow connector → chunk → pack → encode → sink → checkpoint.

``local`` runs it in one process (reader/tokenizer worker processes feeding one encoder); ``ray``
(later) runs the same stage functions (``embedder.runners.stages``) on Ray Data.
"""
