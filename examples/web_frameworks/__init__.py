"""Complete FastAPI and Litestar services that submit kew tasks and stream
their output (docs/async.md, "In a web framework")."""
