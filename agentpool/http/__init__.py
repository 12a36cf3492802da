"""The HTTP API on Ray Serve (`agentpool serve`): runs, live events over SSE, batches,
approvals, API keys per tenant, and the operator console."""
