"""Log formats of the daemon: human-readable text or one JSON object per line.

Only :func:`configure_logging`, called by the daemon's ``main()``, installs a handler.
Records logged with ``extra={"stream_id": n}`` carry that id as a JSON field.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
#: Record attributes copied into JSON lines when present.
EXTRA_FIELDS = ("stream_id",)


class JsonFormatter(logging.Formatter):
    """Format a record as one JSON object: time, level, logger, message, stream_id, exc."""

    def format(self, record: logging.LogRecord) -> str:
        """Return the record as a JSON line."""
        out: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in EXTRA_FIELDS:
            if hasattr(record, key):
                out[key] = getattr(record, key)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure_logging(level: str, fmt: str) -> None:
    """Send every log record at ``level`` or above to stderr, as ``fmt`` (``text``/``json``)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level, handlers=[handler])
