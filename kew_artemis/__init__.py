"""kew_artemis: the STOMP 1.2 provider (``stomp://``, ``stomp+ssl://``) for
Apache Artemis, ActiveMQ Classic and RabbitMQ's STOMP plugin, on stomp.py."""

from kew_artemis._redact import install as _install_log_redaction
from kew_artemis.provider import DIALECTS, SCHEMES, StompConnector, connect

__all__ = ["DIALECTS", "SCHEMES", "StompConnector", "connect"]

_install_log_redaction()  # stomp.py would log the CONNECT frame's passcode
