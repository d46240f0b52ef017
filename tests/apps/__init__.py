"""Small kew.task apps that tests run in worker subprocesses."""
