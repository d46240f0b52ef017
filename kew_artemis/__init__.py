"""kew_artemis: placeholder until its provider lands."""
