"""apikeys server: creates, rotates, revokes and verifies tenant-scoped API keys over gRPC."""
