"""Transport layer: thin gRPC servicers, proto <-> domain conversion, error mapping."""
