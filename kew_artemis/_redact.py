"""Keep the STOMP passcode out of stomp.py's debug log.

stomp.py logs every frame it sends at DEBUG ("sending frame: [...]"); its
own passcode scrubbing (stomp.utils.PASSCODE_RE, 9.0.0) expects a space
after ``passcode:``, which STOMP frames do not have, so the CONNECT frame's
passcode is logged in clear.  This filter on the ``stomp.py`` logger
replaces it with ``***`` in every record before any handler sees it.
"""

from __future__ import annotations

import logging
import re

# up to the end of the header line as it shows in the logged list of byte strings
_PASSCODE = re.compile(r"passcode:.*?(?=\\n['\"]|['\"], |['\"]\]|$)", re.DOTALL)


class RedactPasscode(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        try:
            text = record.getMessage()
        except Exception:
            return True
        if "passcode:" in text:
            record.msg, record.args = _PASSCODE.sub("passcode:***", text), None
        return True


def install() -> None:
    logger = logging.getLogger("stomp.py")
    if not any(isinstance(f, RedactPasscode) for f in logger.filters):
        logger.addFilter(RedactPasscode())
