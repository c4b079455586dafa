"""Domain layer: keys, scopes, verification and management rules. No gRPC, no SQLAlchemy."""
