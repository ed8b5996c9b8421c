"""convert(): the plan's shards written, then index, config, report; the resume manifest."""
