"""kew_redis: placeholder until its provider lands."""
