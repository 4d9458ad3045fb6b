"""Spot-interruption watcher: polls the cloud's instance-metadata endpoint and starts a drain.

AWS posts ``spot/instance-action`` about two minutes before it reclaims a spot instance; until
then the endpoint answers 404. The URL is configurable (``runner.spot_url``) so tests point it at
a local HTTP server. IMDSv2 is used when the token endpoint answers, IMDSv1 otherwise.
"""

from __future__ import annotations

import logging
import threading
import urllib.error
import urllib.request
from collections.abc import Callable

log = logging.getLogger("embedder")

AWS_SPOT_URL = "http://169.254.169.254/latest/meta-data/spot/instance-action"


class SpotWatcher:
    """Calls ``on_notice(text)`` once when the metadata endpoint announces an interruption.

    Args:
        url: The instance-action URL.
        on_notice: Callback that starts the drain.
        interval_s: Poll period.
    """

    def __init__(self, url: str, on_notice: Callable[[str], None], interval_s: float = 5.0) -> None:
        self.url = url
        self.on_notice = on_notice
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="embedder-spot", daemon=True)

    def start(self) -> SpotWatcher:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _token(self) -> str | None:
        base = self.url.split("/latest/", 1)[0]
        request = urllib.request.Request(
            f"{base}/latest/api/token", method="PUT", headers={"X-aws-ec2-metadata-token-ttl-seconds": "300"}
        )
        try:
            with urllib.request.urlopen(request, timeout=1) as response:
                return response.read().decode()
        except (urllib.error.URLError, OSError, ValueError):
            return None

    def poll(self) -> str | None:
        """One poll: the notice text, or None when no interruption is scheduled."""
        headers = {}
        token = self._token()
        if token:
            headers["X-aws-ec2-metadata-token"] = token
        try:
            with urllib.request.urlopen(urllib.request.Request(self.url, headers=headers), timeout=2) as response:
                if response.status == 200:
                    return response.read().decode(errors="replace")
        except urllib.error.HTTPError as err:
            if err.code != 404:
                log.debug("spot watcher: HTTP %s from %s", err.code, self.url)
        except (urllib.error.URLError, OSError, ValueError):
            pass
        return None

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            notice = self.poll()
            if notice:
                log.warning("spot interruption notice: %s; draining", notice.strip()[:200])
                self.on_notice(notice)
                return
