"""kew_rabbitmq: placeholder until its provider lands."""
