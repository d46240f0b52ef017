"""kew_redis: the Redis Streams provider (``redis://``, ``rediss://``, ``unix://``)."""

from kew_redis.provider import SCHEMES, RedisConnector, connect

__all__ = ["SCHEMES", "RedisConnector", "connect"]
