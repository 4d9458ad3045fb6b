"""A run's execution, written once for every runner: the skeleton (``skeleton.Run``), the typed
events schedulers stream to it, the drain policy (``control``), the generation record, the plan,
the run record (``result``) and the telemetry.

(Named ``execution`` rather than ``run`` so that ``embedder.run`` stays the public function.)
"""
