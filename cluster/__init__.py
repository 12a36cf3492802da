"""Infrastructure: Ray bring-up, embedded or external Redis, the Redis result store."""
