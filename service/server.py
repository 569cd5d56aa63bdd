"""Run the app under uvicorn; start-up errors become a clear message and exit code 1."""

from __future__ import annotations

import logging
import signal
import sys
from types import FrameType

from service.config import Settings
from service.core.loading import StartupError

logger = logging.getLogger("embedrank.server")


def run_server(settings: Settings) -> int:
    import uvicorn

    from service.app import create_app
    from service.core.loading import load_configured
    from service.core.registry import ModelRegistry
    from service.observability import configure_logging
    from service.proxy.upstreams import UpstreamConfigError

    configure_logging(settings.log_level, settings.json_output)
    generation_only = not settings.model_id and bool(settings.llm or settings.llm_config)
    try:
        registry = ModelRegistry([]) if generation_only else load_configured(settings)
    except StartupError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    try:
        app = create_app(settings, registry)
    except (RuntimeError, UpstreamConfigError) as error:
        print(f"error: {error}", file=sys.stderr)
        registry.stop()
        return 1
    config = uvicorn.Config(app, host=settings.hostname, port=settings.port, log_config=None, access_log=False,
                            loop="auto", http="auto", lifespan="on",
                            timeout_graceful_shutdown=settings.graceful_shutdown_seconds)
    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            # Readiness drops at once; uvicorn then stops accepting, lets in-flight requests finish
            # (their queued items are still computed) within the grace period, and exits 0.
            app.state.ready = False
            logger.info("shutting down: no longer ready, finishing in-flight requests")
            super().handle_exit(sig, frame)
            # uvicorn re-raises caught signals once drained; a clean SIGTERM shutdown should exit 0.
            if sig == signal.SIGTERM:
                self._captured_signals = [s for s in self._captured_signals if s != signal.SIGTERM]

    server = Server(config)
    server.run()
    if not server.started:
        return 1
    return 0
