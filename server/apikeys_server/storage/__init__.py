"""Storage layer: SQLAlchemy models and repository, the Verify cache, migrations."""
