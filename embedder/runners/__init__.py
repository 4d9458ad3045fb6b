"""Schedulers: where a run's stages execute. The run itself (lease, plan, commits, canaries, drain,
finish) is ``embedder.execution.skeleton.Run``, written once; a scheduler only places the stages of
``embedder.pipeline`` and streams their events back (``embedder.runners.base.Scheduler``).

``local`` runs them on this machine (reader processes feeding one encoder per device); ``ray`` on a
Ray cluster, CPU stages as Ray Data tasks and one encoder actor per GPU (see docs/ray.md).
"""
