"""The scheduler: admission, queueing and dispatch of tasks to agent workers."""
