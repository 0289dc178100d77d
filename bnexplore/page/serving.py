"""What starts with the server, before any page opens: ``streamlit run app.py`` finds the
``st.App`` in app.py and serves it, and its lifespan is here.

On start, the workers of the default link's engines begin importing their frameworks, and
the page's own modules (the view, the charts, pandas and Altair) import in a thread, so the
first visitor's page waits for neither; the page then starts, early, the workers of any other
engines its link names (pool.start_early). On shutdown, every worker stops, and the
server's shared-memory files go.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import threading
from collections.abc import AsyncIterator

from bnexplore.runs import pool, shipping

log = logging.getLogger(__name__)

PAGE_MODULES = ("bnexplore.page.view", "bnexplore.page.charts", "bnexplore.page.widgets")
"""What app.py imports that takes seconds (pandas, Altair, the judging): loaded at start."""


def _import_page() -> None:
    for name in PAGE_MODULES:
        importlib.import_module(name)


def log_to_stderr(level: str) -> None:
    """bnexplore's own log lines (one per computation, workers started and lost) beside
    Streamlit's, at Streamlit's ``logger.level``; once per process."""
    logger = logging.getLogger("bnexplore")
    if not any(getattr(h, "bnexplore", False) for h in logger.handlers):
        handler = logging.StreamHandler()
        handler.bnexplore = True  # type: ignore[attr-defined]
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(level.upper())


def start() -> None:
    """The default link's workers, started once per server, and the page's imports."""
    from streamlit import config

    log_to_stderr(config.get_option("logger.level"))
    pool.start_early([])
    log.info("server start: workers %s importing", pool.POOL.processes())
    threading.Thread(target=_import_page, name="bnexplore page imports", daemon=True).start()


@contextlib.asynccontextmanager
async def lifespan(_app) -> AsyncIterator[None]:
    """st.App's lifespan: ``start`` on the way up; the workers stop on the way down."""
    start()
    try:
        yield None
    finally:
        pool.POOL.shutdown()
        shipping.FILES.clear()  # the server may not reach its atexit hooks
