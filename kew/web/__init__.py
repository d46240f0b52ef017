"""kew.web: the REST front end and monitoring page of a kew task app
(extra ``web``; docs/web.md).  ``kew serve MODULE:APP`` runs it."""

from kew.web.app import Submitted, create_app
from kew.web.config import Token, WebConfig, load_config

__all__ = ["Submitted", "Token", "WebConfig", "create_app", "load_config"]
