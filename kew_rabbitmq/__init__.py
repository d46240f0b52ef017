"""kew_rabbitmq: the RabbitMQ provider (``amqp://``, ``amqps://``), on pika."""

from kew_rabbitmq.provider import SCHEMES, RabbitConnector, connect

__all__ = ["SCHEMES", "RabbitConnector", "connect"]
